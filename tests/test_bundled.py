"""The models that ship in the package: they load by name (and by default), fit the size budget, have learnt
something, and generate deterministic text with greedy decoding, through a cache that rolls."""

import json

import pytest
import torch
from safetensors import safe_open

from sirocco.cli import main
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.pretrained import BUNDLED, DEFAULT_MODEL, bundled_models, load
from sirocco.train.corpus import pydoc_topics
from sirocco.train.losses import cross_entropy_sum

pytestmark = pytest.mark.usefixtures("one_thread")      # tiny models: see conftest.py


NAMES = ["sirocco-tiny", "sirocco-tiny-moe"]
GREEDY = SamplingParams(max_tokens=80, temperature=0.0, stop_on_eos=False)


@pytest.fixture(scope="module", params=NAMES)
def bundled(request):
    return request.param, load(request.param)


def test_bundled_models_are_listed_and_fit_in_16_mb():
    assert bundled_models() == NAMES and DEFAULT_MODEL == "sirocco-tiny"
    size = 0
    for name in NAMES:
        folder = BUNDLED / name
        assert {p.name for p in folder.iterdir()} >= {"params.json", "consolidated.safetensors", "tokenizer.model"}
        size += sum(p.stat().st_size for p in folder.iterdir())
        with safe_open(folder / "consolidated.safetensors", "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())  # noqa: SIM118 -- safe_open has keys(), not iteration
    assert size < 16_000_000


def test_architectures_and_default():
    dense = json.loads((BUNDLED / "sirocco-tiny" / "params.json").read_text())
    moe = json.loads((BUNDLED / "sirocco-tiny-moe" / "params.json").read_text())
    assert "moe" not in dense and dense["sliding_window"] < 100     # the demo's generations outrun the window
    assert moe["moe"]["num_experts"] in (4, 8) and moe["moe"]["num_experts_per_tok"] == 2
    default = load(None)
    assert default.model.args.moe is None and default.model.args.sliding_window == dense["sliding_window"]
    assert next(default.model.parameters()).dtype == torch.float32      # bf16 on disk, upcast on load


@torch.no_grad()
def test_bundled_model_beats_the_unigram_baseline_on_python_documentation(bundled):
    """Mean cross-entropy on a few pydoc topics, far below the corpus's unigram entropy (6.4 nats)."""
    _, loaded = bundled
    texts = [t[:1500] for t, s in pydoc_topics() if s in ("topic:with", "topic:for", "topic:lambda")]
    total = count = 0
    for text in texts:
        ids = torch.tensor(loaded.tokenizer.encode(text, bos=True, eos=False))
        logits = loaded.model(ids[:-1], [len(ids) - 1])
        total += float(cross_entropy_sum(logits, ids[1:]))
        count += len(ids) - 1
    assert total / count < 4.5


@torch.no_grad()
def test_greedy_generation_is_deterministic_and_equals_full_recomputation(bundled):
    """Greedy tokens from the engine (packed pre-fill, rolling cache past the window) equal the argmax of a
    plain forward over the whole sequence, token after token; a second run gives the same text."""
    name, loaded = bundled
    model, tok = loaded.model, loaded.tokenizer
    prompts = ["The with statement", "Return a new list"]
    engine = Engine(model, tok, max_rows=4, max_seq_len=128)
    first = engine.generate(prompts, GREEDY)
    again = Engine(model, tok, max_rows=4, max_seq_len=128).generate(prompts, GREEDY)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert all(len(c.text) > 40 for c in first)
    for prompt, c in zip(prompts, first, strict=True):
        ids = tok.encode(prompt, bos=True)
        window = model.args.sliding_window
        if window is not None:
            assert len(ids) + len(c.tokens) > window + 10                # the cache has rolled
        for _ in range(len(c.tokens)):
            ids.append(int(model(torch.tensor(ids), [len(ids)])[-1].argmax()))
        assert ids[-len(c.tokens):] == c.tokens, name


def test_generate_command_uses_the_bundled_models(capsys):
    assert main(["generate", "--no-progress", "--json", "--temperature", "0", "--max-tokens", "8",
                 "The with statement"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", "sirocco-tiny", "--no-progress", "--json", "--temperature", "0",
                 "--max-tokens", "8", "The with statement"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == default["tokens"]
    assert main(["generate", "--model", "sirocco-tiny-moe", "--no-progress", "--json", "--temperature", "0",
                 "--max-tokens", "8", "The with statement"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8
    assert main(["generate", "--model", "no-such-model", "hi"]) == 1
    assert "sirocco-tiny, sirocco-tiny-moe, random-tiny" in capsys.readouterr().err
