"""``sirocco perplexity`` against transformers' own computation on the same weights, with the same windows and
stride (Hugging Face's "perplexity of fixed-length models" loop, written out here)."""

import json
import math

import pytest
import torch

from sirocco.checkpoint import load_model
from sirocco.cli import main
from sirocco.eval import perplexity, windows
from sirocco.pretrained import BUNDLED
from sirocco.tokenizer import load_tokenizer

from hf_fixtures import hf_model

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_perplexity(model, ids: torch.Tensor, context: int, stride: int) -> tuple[int, float]:
    """(tokens scored, mean NLL): HF's loop, every window scoring the labels the previous one did not, each
    window's mean loss weighted by its exact count of scored labels."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        trg_len = end - prev_end
        inp = ids[begin:end]
        labels = inp.clone()
        labels[:-trg_len] = -100
        with torch.no_grad():
            loss = model(inp[None], labels=labels[None]).loss
        scored = int((labels[1:] != -100).sum())
        nll += loss.item() * scored
        count += scored
        prev_end = end
        if end == ids.numel():
            break
    return count, nll / count


def test_windows():
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]     # each window's first token unscored
    assert windows(3, 8, 4) == [(0, 3, 2)]
    for n, c, s in [(50, 16, 5), (17, 16, 15), (100, 7, 1)]:
        assert sum(k for _, _, k in windows(n, c, s)) == n - 1


@pytest.mark.parametrize("kind,window", [("mistral", 6), ("mistral", None), ("mixtral", 6)])
@pytest.mark.parametrize("context,stride", [(32, 32), (32, 12), (40, 1000 // 100)])
def test_perplexity_equals_transformers(tmp_path, kind, window, context, stride):
    hf = hf_model(kind, window=window)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.cat([torch.tensor([1]), torch.randint(3, 320, (99,))])
    got = perplexity(model, ids, context, stride)
    count, nll = hf_perplexity(hf, ids, context, stride)
    assert got.tokens == count == (99 if stride < context else 99 - (99 // context))
    assert abs(got.nats_per_token - nll) < 1e-5
    assert abs(got.perplexity - math.exp(nll)) < 1e-5 * math.exp(nll)


def test_perplexity_cli_json(tmp_path, capsys):
    folder = tmp_path / "hf"
    hf = hf_model("mistral", window=8, vocab_size=4096)
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((BUNDLED / "sirocco-tiny" / "tokenizer.model").read_bytes())
    text = "The sliding window attends to W keys, counting the query itself. " * 4 + "Done: 42 ünïcode."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    argv = ["perplexity", "--model", str(folder), "--text-file", str(tmp_path / "t.txt"), "--context", "24",
            "--stride", "10", "--json", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    ids = torch.tensor(load_tokenizer(folder).encode(text, bos=True))
    count, nll = hf_perplexity(hf, ids, 24, 10)
    assert set(result) == {"tokens", "nats_per_token", "perplexity"} and result["tokens"] == count == len(ids) - 1
    assert abs(result["nats_per_token"] - nll) < 1e-5
    assert main(argv + ["--quantize", "int8"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["tokens"] == count and abs(q["nats_per_token"] - nll) < 0.05 * nll    # close, not equal
