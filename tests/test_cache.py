"""Invariants of the rolling cache: incremental == one-shot, chunked == unchunked, bounded memory."""

import pytest
import torch

from sirocco import backends
from sirocco.cache import RollingCache
from sirocco.config import preset
from sirocco.model import build_model

CONFIGS = {"mistral": preset("tiny"), "mixtral": preset("tiny-moe"),
           "mixed-windows": preset("tiny", n_layers=3, sliding_window=[4, None, 8])}


def run_chunked(model, seqs, chunk, cache, attention="per_sequence", backend="torch"):
    backends.attach(model, backend, prefill=attention)
    """Feed every sequence through the cache `chunk` tokens at a time, all sequences in each step; a
    sequence that is done drops out. Returns the logits of every position, per sequence."""
    outs = [[] for _ in seqs]
    done = [0] * len(seqs)
    with torch.no_grad():
        while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
            act = [b for b, s in enumerate(seqs) if done[b] < len(s)]
            lens = [min(chunk, len(seqs[b]) - done[b]) for b in act]
            toks = torch.cat([seqs[b][done[b]:done[b] + n] for b, n in zip(act, lens, strict=True)])
            plan = model.plan(lens, starts=[done[b] for b in act], rows=act, cache=cache)
            for b, n, o in zip(act, lens, model(toks, plan, cache).split(lens), strict=True):
                outs[b].append(o)
                done[b] += n
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunk", [1, 3, 8, 11, 40])     # 1 is pure decode; W is 8 (4 and 8 in mixed)
def test_chunked_and_incremental_equal_one_shot(name, chunk):
    args = CONFIGS[name]
    model = build_model(args, seed=11)
    seqs = [torch.randint(0, args.vocab_size, (n,)) for n in (29, 5, 17)]
    with torch.no_grad():
        one_shot = [model(s, [len(s)]) for s in seqs]
    cache = RollingCache(args, rows=3, max_seq_len=64)
    for got, want in zip(run_chunked(model, seqs, chunk, cache), one_shot, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_dense_backend_with_cache_matches():
    args = CONFIGS["mistral"]
    model = build_model(args, seed=12)
    seqs = [torch.randint(0, 256, (n,)) for n in (21, 13)]
    a = run_chunked(model, seqs, 5, RollingCache(args, rows=2, max_seq_len=64), attention="dense")
    b = run_chunked(model, seqs, 5, RollingCache(args, rows=2, max_seq_len=64), attention="per_sequence")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def test_cache_is_bounded_by_the_window():
    args = preset("tiny", sliding_window=8, max_seq_len=4096)
    cache = RollingCache(args, rows=2)
    shapes = {tuple(c.k.shape) for c in cache.layers.values()}
    assert shapes == {(2, args.n_kv_heads, 8, args.head_dim)}
    model = build_model(args, seed=13)
    ptrs = [c.k.data_ptr() for c in cache.layers.values()]
    run_chunked(model, [torch.randint(0, 256, (300,))], 1, cache)    # 300 decode steps: the ring wraps 37 times
    assert [c.k.data_ptr() for c in cache.layers.values()] == ptrs
    assert cache.nbytes() == 2 * 2 * 2 * 8 * args.n_kv_heads * args.head_dim * 4


def test_cache_without_window_is_max_seq_len_long():
    args = CONFIGS["mixtral"]
    cache = RollingCache(args, rows=1, max_seq_len=50)
    assert {c.size for c in cache.layers.values()} == {50}
    model = build_model(args, seed=14)
    with pytest.raises(ValueError, match="exceeds the cache of 50"):
        model.plan([51], starts=[0], rows=[0], cache=cache)


@pytest.mark.parametrize("name", ["mistral", "mixed-windows"])
def test_room_for_drafts_changes_no_pre_fill_and_no_decode(name):
    """A ring of W + k slots: chunked pre-fill and decode give what a ring of W slots gives, bit for bit on the
    cpu backend (the pre-fill reads only the window's keys back; decode reads its window in the order of a ring
    of W)."""
    args = CONFIGS[name]
    model = build_model(args, seed=15)
    seqs = [torch.randint(0, args.vocab_size, (n,)) for n in (23, 9)]
    spare = RollingCache(args, rows=2, max_seq_len=64, spare_slots=3)
    assert {spare.size_for(w) for w in args.windows()} == ({11} if name == "mistral" else {7, 64, 11})
    for chunk in (1, 5):
        plain = run_chunked(model, seqs, chunk, RollingCache(args, rows=2, max_seq_len=64), backend="cpu")
        roomy = run_chunked(model, seqs, chunk, RollingCache(args, rows=2, max_seq_len=64, spare_slots=3),
                            backend="cpu")
        assert all(torch.equal(a, b) for a, b in zip(plain, roomy, strict=True))
    assert RollingCache(args, rows=1, max_seq_len=10, spare_slots=3).size_for(8) == 10      # at most max_seq_len
    with pytest.raises(ValueError, match="spare_slots must be >= 0"):
        RollingCache(args, rows=1, spare_slots=-1)
