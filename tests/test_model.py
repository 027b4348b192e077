"""The model against the plain reference implementation, on packed sequences, both attention backends."""

import os
import subprocess
import sys

import pytest
import torch

from sirocco import backends
from sirocco.config import preset
from sirocco.model import Transformer, build_model, rope_tables

from reference import reference_logits

CONFIGS = {
    "mistral": preset("tiny"),                                     # window 8 < sequence lengths below
    "mixtral": preset("tiny-moe"),
    "per-layer-windows": preset("tiny", n_layers=3, sliding_window=[4, None, 6]),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("backend", ["dense", "per_sequence"])
def test_packed_forward_matches_reference(name, backend):
    args = CONFIGS[name]
    model = build_model(args, seed=1)
    lengths = [19, 3, 11, 1]
    seqs = [torch.randint(0, args.vocab_size, (n,)) for n in lengths]
    with torch.no_grad():
        backends.attach(model, "torch", prefill=backend)
        out = model(torch.cat(seqs), model.plan(lengths))
    sd = model.state_dict()
    for got, toks in zip(out.split(lengths), seqs, strict=True):
        torch.testing.assert_close(got, reference_logits(sd, args, toks), atol=2e-5, rtol=1e-5)


def test_packed_equals_alone():
    model = build_model(CONFIGS["mixtral"], seed=2)
    lengths = [7, 13, 2]
    seqs = [torch.randint(0, 256, (n,)) for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(seqs), lengths).split(lengths)
        for got, toks in zip(packed, seqs, strict=True):
            torch.testing.assert_close(got, model(toks, [len(toks)]), atol=1e-5, rtol=1e-5)


def test_window_counts_the_query_itself():
    """W = 4: token 2 is seen by queries 2, 3, 4, 5 of layer one and by no other."""
    args = preset("tiny", n_layers=1, sliding_window=4)
    model = build_model(args, seed=3)
    toks = torch.randint(0, 256, (10,))
    changed = toks.clone()
    changed[2] = (toks[2] + 1) % 256
    with torch.no_grad():
        diff = (model(toks, [10]) - model(changed, [10])).abs().amax(-1)
    assert (diff[2:6] > 1e-4).all(), diff
    assert (diff[:2] == 0).all() and (diff[6:] == 0).all(), diff


def test_no_attention_across_packed_sequences():
    model = build_model(CONFIGS["mistral"], seed=4)
    a, b = torch.randint(0, 256, (6,)), torch.randint(0, 256, (6,))
    b2 = b.clone()
    b2[0] = (b[0] + 7) % 256
    with torch.no_grad():
        out1 = model(torch.cat([a, b]), [6, 6])
        out2 = model(torch.cat([a, b2]), [6, 6])
    assert torch.equal(out1[:6], out2[:6])


def test_logits_at_selects_rows():
    model = build_model(CONFIGS["mistral"], seed=5)
    toks = torch.randint(0, 256, (12,))
    with torch.no_grad():
        full = model(toks, [5, 7])
        some = model(toks, [5, 7], logits_at=torch.tensor([4, 11]))
    torch.testing.assert_close(some, full[[4, 11]])


def test_meta_device_build_has_no_storage():
    with torch.device("meta"):
        model = Transformer(preset("mistral-7b-v0.1"))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == preset("mistral-7b-v0.1").num_parameters()


def test_meta_build_imports_no_compiler_and_a_real_build_keeps_the_embedding_init():
    # a loader builds the model on meta first: torch's meta normal_ (nn.Embedding's init) would import
    # torch._dynamo, ~70 MB resident in every process that loads a model (measured by bench_quant's peak memory)
    code = ("import sys, torch\n"
            "from sirocco.config import preset\n"
            "from sirocco.model import Transformer\n"
            "with torch.device('meta'):\n"
            "    Transformer(preset('tiny'))\n"
            "print('torch._dynamo' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False", out.stderr
    weight = Transformer(preset("tiny")).tok_embeddings.weight            # on CPU: nn.Embedding's normal(0, 1)
    assert torch.isfinite(weight).all() and 0.9 < weight.std().item() < 1.1


def test_rope_tables_grow_with_the_positions_used_and_give_the_full_tables_rows():
    args = preset("tiny", max_seq_len=10000)
    model = Transformer(args)
    full_cos, full_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    positions = torch.tensor([0, 17, 4095])
    cos, sin = model.rope(positions, 4096)
    assert len(model._rope[0]) == 4096
    assert torch.equal(cos, full_cos[positions]) and torch.equal(sin, full_sin[positions])
    positions = torch.tensor([3, 5000])
    cos, sin = model.rope(positions, 5001)
    assert len(model._rope[0]) == 8192
    assert torch.equal(cos, full_cos[positions]) and torch.equal(sin, full_sin[positions])
    model.rope(torch.tensor([9999]), 10000)
    assert len(model._rope[0]) == 10000                            # never past max_seq_len
    model.rope(torch.tensor([1]), 2)
    assert len(model._rope[0]) == 10000                            # never shrinks


def test_bfloat16_close_to_float32():
    args = CONFIGS["mistral"]
    m32 = build_model(args, seed=6)
    m16 = build_model(args, seed=6, dtype=torch.bfloat16)
    toks = torch.randint(0, 256, (20,))
    with torch.no_grad():
        a, b = m32(toks, [20]), m16(toks, [20]).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_gradients_flow_through_both_backends():
    args = CONFIGS["mistral"]
    grads = []
    toks = torch.randint(0, 256, (30,))
    for backend in ["dense", "per_sequence"]:
        model = build_model(args, seed=7)
        backends.attach(model, "torch", prefill=backend)
        loss = model(toks, model.plan([12, 18])).logsumexp(-1).mean()
        loss.backward()
        grads.append(model.layers["0"].attention.wq.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
