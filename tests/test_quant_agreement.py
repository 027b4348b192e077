"""``--quantize int8`` / ``int4`` on the bundled models: the quantized model picks the bf16 model's greedy token
at most positions of the bf16 model's own continuations (teacher-forced, so one early difference does not hide
the rest). The shares are printed (``pytest -s``) and bounded below."""

import pytest
import torch

from sirocco import backends
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.pretrained import load

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The with statement", "Return a new dictionary", "A module is", "The sliding window", "def f(x):"]
FLOOR = {"int8": 0.97, "int4": 0.9}


def agreement(name: str, fmt: str) -> float:
    base = load(name, dtype=torch.bfloat16, backend="torch").model
    tok = load(name, dtype=torch.bfloat16).tokenizer
    engine = Engine(base, tok, max_rows=len(PROMPTS))
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, stop_on_eos=False))
    quantized = load(name, dtype=torch.bfloat16).model
    backends.attach(quantized, "torch", quantize=fmt)
    same = total = 0
    with torch.inference_mode():
        for c in done:
            ids = torch.tensor(c.prompt_tokens + c.tokens[:-1])
            n = len(c.tokens)
            picks = quantized(ids, [len(ids)])[-n:].argmax(-1)            # each position's choice, bf16 history
            same += int((picks == torch.tensor(c.tokens)).sum())
            total += n
    return same / total


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("name", ["sirocco-tiny", "sirocco-tiny-moe"])
def test_quantized_greedy_tokens_agree_with_bf16(name, fmt):
    share = agreement(name, fmt)
    print(f"{name} {fmt}: {share:.1%} of greedy tokens equal to bf16's")
    assert share >= FLOOR[fmt]


def test_the_cpu_backend_counts_quantized_weights_when_it_decides_whether_it_pays():
    from sirocco.backends import cpu
    from sirocco.config import preset
    from sirocco.model import build_model
    model = build_model(preset("tiny", vocab_size=64), dtype=torch.bfloat16)
    backends.attach(model, "torch", quantize="int8")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = sum(b.numel() * b.element_size() for b in model.buffers())
    assert blocks > 0 and cpu.pays(model, min_bytes=params + blocks) and not cpu.pays(model, params + blocks + 1)
