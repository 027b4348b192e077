"""Greedy generation of the engine (packed prompts, rolling cache, chunked pre-fill) equals transformers'
greedy ``generate`` on the same weights, loaded from the checkpoint transformers itself wrote."""

import pytest
import torch

from sirocco.checkpoint import load_model
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams

from hf_fixtures import save_hf_checkpoint


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_greedy_equals_transformers(kind, tmp_path):
    hf = save_hf_checkpoint(kind, tmp_path, window=6, seed=7)
    model = load_model(tmp_path)
    prompts = [torch.randint(3, 320, (n,)).tolist() for n in (13, 4, 9)]      # window 6: the ring wraps
    n_new = 24
    engine = Engine(model, None, max_rows=2, chunk_size=5, max_seq_len=64)      # 3 prompts over 2 rows
    ours = engine.generate(prompts, SamplingParams(max_tokens=n_new))
    for prompt, c in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert c.tokens == out[0, len(prompt):].tolist()
