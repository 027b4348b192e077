"""What each quantization mix costs in perplexity, on a model trained here for a few seconds whose rows are
multiples of 256 (so the K types and iq4_xs are themselves used, not their 32-value fallbacks).

The figures are printed (``pytest -s``), not asserted against llama.cpp, which is no dependency of the suite:
``benchmarks/bench_gguf_types.py --llama-cpp DIR`` compares them with llama.cpp's on the same files. A model trained
for seconds is not at a minimum of its loss, so a small weight error may lower its perplexity as well as raise it,
and the costs need not follow the bits: asserted here are only that every figure is finite and that q8_0 costs
under 1%. (That the GGUF file of a mix holds the model quantized in memory: test_quant_mix_files.py.)"""

import copy
import math

import pytest
import torch

from sirocco import backends
from sirocco.backends.quant.linear import QuantLinear
from sirocco.config import ModelArgs
from sirocco.eval import perplexity
from sirocco.model import build_model
from sirocco.train.corpus import build, pydoc_topics
from sirocco.train.data import PackedStream, tokenize
from sirocco.train.loop import LocalStep, Trainer
from sirocco.train.recipe import TrainRecipe

from fakes import ByteTokenizer

MIXES = ["q8_0", "q6_K", "q5_K_M", "q4_K_M", "iq4_xs", "q4_0", "q3_K_M", "q2_K"]
ARGS = ModelArgs(dim=256, n_layers=1, head_dim=64, hidden_dim=768, n_heads=4, n_kv_heads=1, norm_eps=1e-5,
                 vocab_size=259, max_seq_len=256)
CONTEXT, STRIDE = 128, 64


@pytest.fixture(scope="module")
def trained():
    """The model after 60 steps of 8 rows of 64 bytes of the pydoc topics, and 6,000 validation bytes."""
    corpus = build(pydoc_topics(), val_fraction=0.1)
    tok = ByteTokenizer()
    train_docs = tokenize([d.text for d in corpus.train[:200]], tok)
    val = [t for doc in tokenize([d.text for d in corpus.val[:40]], tok) for t in doc][:6000]
    model = build_model(ARGS, seed=0)
    recipe = TrainRecipe(lr=1e-2, warmup=5, steps=60, batch_rows=8, autocast="off", weight_decay=0.0)
    trainer = Trainer(LocalStep(model, recipe), recipe, PackedStream(train_docs, 64, recipe.batch_rows, 0), [])
    for _ in range(recipe.steps):
        trainer.train_step()
    return model.eval(), val


def f16_weights(model):
    """The model with every weight matrix rounded through fp16: the F16 GGUF file the costs are measured from."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return out


def test_each_mix_costs_perplexity_over_f16(trained):
    model, val = trained
    with torch.inference_mode():
        base = perplexity(f16_weights(model), val, CONTEXT, STRIDE).perplexity
    assert math.log(base) < math.log(259) - 1.0, base           # it learned something: far below uniform
    costs = {}
    for mix in MIXES:
        quantized = copy.deepcopy(model)
        report = backends.attach(quantized, "torch", quantize=mix).quantized
        assert report is not None
        with torch.inference_mode():
            costs[mix] = perplexity(quantized, val, CONTEXT, STRIDE).perplexity / base - 1
        bits = 8 * sum(m.qweight.numel() for m in quantized.modules() if isinstance(m, QuantLinear)) / sum(
            m.in_features * m.out_features for m in quantized.modules() if isinstance(m, QuantLinear))
        print(f"{mix:>7}: {bits:.2f} bits per weight, perplexity {base * (1 + costs[mix]):.4f}, "
              f"{100 * costs[mix]:+.3f}% over f16 ({base:.4f}); {report.types}")
    assert all(math.isfinite(c) for c in costs.values())
    assert abs(costs["q8_0"]) < 0.01
