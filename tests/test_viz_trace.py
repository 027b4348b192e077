"""The trace records what the engine's schedule really runs: masks as lowered, cache slots, router choices."""

import pytest
import torch

from sirocco.config import preset
from sirocco.model import build_model
from sirocco.viz import Trace, analysis, record_run

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = {  # name: (model overrides, prompt lengths, chunk size, max tokens, max batch tokens)
    "w3-chunk3": (dict(sliding_window=3), [7, 5, 6], 3, 3, None),
    "w3-chunk7": (dict(sliding_window=3), [7, 5, 6], 7, 2, None),
    "w4-chunk1": (dict(sliding_window=4), [5, 2], 1, 2, None),
    "w3-uneven": (dict(sliding_window=3), [10, 8], 7, 3, 10),        # starts differ across sequences
    "mixed-windows": (dict(n_layers=3, sliding_window=[3, None, 5]), [9, 4, 6], 4, 3, None),
}


def _run(name, backend="per_sequence"):
    over, prompts, chunk, max_tokens, mbt = RUNS[name]
    model = build_model(preset("tiny", **over), seed=1)
    trace = Trace()
    record_run(model, prompts, None, chunk, max_tokens, trace, max_batch_tokens=mbt, attention=backend)
    return model, trace


def pairs(m, seq=None):
    """Allowed (query position, key position) pairs of a MaskRecord (or a masks-JSON step) per sequence."""
    queries, keys, allowed = (m.queries, m.keys, m.allowed) if hasattr(m, "queries") else (
        m["queries"], m["keys"], m["allowed"])
    out = set()
    for (qs, qp), row in zip(queries, allowed, strict=True):
        for (ks, kp, _slot), a in zip(keys, row, strict=True):
            if a and (seq is None or qs == seq):
                out.add((qs, qp, ks, kp))
    return out


@pytest.mark.parametrize("backend", ["per_sequence", "dense"])
@pytest.mark.parametrize("name", RUNS)
def test_recorded_masks_are_the_definition(name, backend):
    _model, trace = _run(name, backend)
    # (with chunks of 1 token every step runs as a decode step over the cache, pre-fill included)
    assert trace.steps[0].phase == ("decode" if RUNS[name][2] == 1 else "first chunk")
    assert trace.steps[-1].phase == "decode"
    for st in trace.steps:
        for w, m in st.masks.items():
            for (qs, qp), row in zip(m.queries, m.allowed, strict=True):
                for (ks, kp, _), a in zip(m.keys, row, strict=True):
                    want = kp is not None and qs == ks and 0 <= qp - kp < (w if w is not None else 10**9)
                    assert bool(a) == want, (st.step, w, (qs, qp), (ks, kp))
                # ... and each query sees every position of its window exactly once
                seen = sorted(kp for (ks, kp, _), a in zip(m.keys, row, strict=True) if a)
                lo = 0 if w is None else max(0, qp - w + 1)
                assert seen == list(range(lo, qp + 1)), (st.step, w, (qs, qp), seen)


def test_phases_follow_the_schedule():
    _, trace = _run("w3-uneven")
    assert [(s.phase, s.starts, s.lengths) for s in trace.steps] == [
        ("first chunk", [0, 0], [7, 3]), ("later chunk", [7, 3], [3, 5]),
        ("decode", [10, 8], [1, 1]), ("decode", [11, 9], [1, 1])]
    # A step budget of 7 leaves the second prompt out of the first step: it starts beside a later chunk.
    model = build_model(preset("tiny", sliding_window=3), seed=1)
    trace = Trace()
    record_run(model, [10, 8], None, 7, 1, trace, max_batch_tokens=7)
    assert [(s.phase, s.starts, s.lengths) for s in trace.steps][:2] == [
        ("first chunk", [0], [7]), ("mixed", [7, 0], [3, 4])]
    assert {q[0] for q in trace.steps[1].masks[3].queries} == {0, 1}


def _notebook_pairs(q_layout, k_layout, rows):
    """Pairs of a notebook table: ``rows[i]`` = the key columns query row i sees; the layouts map a row / a
    column index to (sequence, position)."""
    return {(*q_layout(i), *k_layout(c)) for i, cols in enumerate(rows) for c in cols}


def test_notebook_mask_1_first_chunk():
    # BlockDiagonalCausalMask.from_seqlens([7, 5, 6]).make_local_attention(3): 18 x 18, three causal bands.
    model = build_model(preset("tiny", sliding_window=3), seed=1)
    trace = Trace()
    record_run(model, [7, 5, 6], None, 7, 1, trace)
    step = trace.steps[0]
    assert step.phase == "first chunk" and len(step.masks[3].queries) == len(step.masks[3].keys) == 18
    starts = [0, 7, 12]

    def layout(i):
        s = max(b for b in range(3) if starts[b] <= i)
        return s, i - starts[s]
    rows = [range(max(starts[layout(i)[0]], i - 2), i + 1) for i in range(18)]
    assert pairs(step.masks[3]) == _notebook_pairs(layout, layout, rows)


def test_notebook_mask_2_later_chunk_bottom_right():
    # BlockDiagonalMask.from_seqlens([3, 5], [10, 8]).make_local_attention_from_bottomright(3): 8 x 18.
    # "Query 0 sees keys 5-7, query 2 keys 7-9; queries 3-7 see keys 11-13 ... 15-17."
    model = build_model(preset("tiny", sliding_window=3), seed=1)
    trace = Trace()
    record_run(model, [10, 8], None, 7, 1, trace, max_batch_tokens=10)   # chunks [7, 3] then [3, 5]
    step = trace.steps[1]
    assert step.phase == "later chunk" and step.lengths == [3, 5]
    rows = [range(5, 8), range(6, 9), range(7, 10)] + [range(11 + j, 14 + j) for j in range(5)]
    q_layout = lambda i: (0, 7 + i) if i < 3 else (1, i)
    k_layout = lambda c: (0, c) if c < 10 else (1, c - 10)
    want = _notebook_pairs(q_layout, k_layout, rows)
    # The rolling cache holds only the W keys before each chunk (6 + 8 keys, not 10 + 8), but every pair inside
    # the window is there, and the recorded keys are exactly the cached ones: slots of the oldest-first prefix.
    assert pairs(step.masks[3]) == want
    assert [k for k in step.masks[3].keys if k[2] is not None] == [(0, 4, 1), (0, 5, 2), (0, 6, 0),
                                                                   (1, 0, 0), (1, 1, 1), (1, 2, 2)]


def test_notebook_mask_3_decode_padded_keys():
    # BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_seqlen=[1, 1], kv_padding=6, kv_seqlen=[3, 5]):
    # 2 x 12, "query 0 sees keys 0-2, query 1 keys 6-10". No window cuts these: W = 6 (= S) here.
    model = build_model(preset("tiny", sliding_window=6), seed=1)
    trace = Trace()
    record_run(model, [2, 4], None, 6, 2, trace)       # pre-fill [2, 4], then decode at positions 2 and 4
    step = trace.steps[1]
    m = step.masks[6]
    assert step.phase == "decode" and m.queries == [(0, 2), (1, 4)] and m.lowering == "decode_valid"
    want = _notebook_pairs(lambda i: (i, [2, 4][i]), lambda c: (c // 6, c % 6), [range(0, 3), range(6, 11)])
    assert pairs(m) == want
    # sirocco pads each row to the fullest row's keys (5), not 6: the plan reads no slot no one may see.
    assert m.padding == 5 and len(m.keys) == 10


@pytest.mark.parametrize("name", ["w3-chunk3", "mixed-windows"])
def test_receptive_field_from_masks_equals_gradient_pattern(name):
    over, _prompts, chunk, _, _ = RUNS[name]
    over = {**over, "n_layers": 4, "sliding_window": over["sliding_window"] if name != "mixed-windows"
            else [3, None, 5, 3]}
    model = build_model(preset("tiny", **over), seed=2)
    trace = Trace()
    gen, _ = record_run(model, [9], None, chunk, 3, trace)
    pos = 10                                          # the last token fed: a decode step's query
    tokens = torch.tensor([t for s in trace.steps for t in s.token_ids])
    assert len(tokens) == pos + 1 and tokens[-2:].tolist() == gen[0][:2]
    from_masks = analysis.receptive_field(trace, 0, pos)
    from_grad = analysis.gradient_receptive_field(model, tokens, pos)
    assert from_masks == from_grad
    if name == "w3-chunk3":
        assert [(min(s), max(s)) for s in from_masks] == [(8, 10), (6, 10), (4, 10), (2, 10)]


@pytest.mark.parametrize("name", ["w3-chunk3", "w4-chunk1", "w3-uneven", "mixed-windows"])
def test_cache_map_and_cached_keys(name):
    over, prompts, chunk, max_tokens, mbt = RUNS[name]
    args = preset("tiny", **over)
    model = build_model(args, seed=3)
    trace = Trace()
    gen, cache = record_run(model, prompts, None, chunk, max_tokens, trace, max_batch_tokens=mbt, max_seq_len=32)
    for st in trace.steps:
        for w, rows in st.slots.items():
            S = cache.size_for(w)
            for row, held in rows.items():
                last = st.cached[row] - 1 if row in st.cached else max(p for p in held if p is not None)
                want = [max((p for p in range(last + 1) if p % S == s), default=None) for s in range(S)]
                assert held == want, (st.step, w, row)
    # Keys in the cache after the run == the rotated keys of a forward without cache at those positions.
    fed = {}
    for st in trace.steps:
        for (seq, pos), t in zip(st.masks[next(iter(st.masks))].queries, st.token_ids, strict=True):
            fed[(seq, pos)] = t
    for b in range(len(prompts)):
        tokens = torch.tensor([fed[(b, p)] for p in range(max(p for s, p in fed if s == b) + 1)])
        keys = {}
        hooks = [layer.attention.wk.register_forward_hook(lambda m, i, o, l=int(n), keys=keys: keys.__setitem__(l, o))
                 for n, layer in model.layers.items()]
        with torch.no_grad():
            model(tokens, [len(tokens)])
        for h in hooks:
            h.remove()
        T = len(tokens)
        rope = model.rope(torch.arange(T))
        last = trace.steps[-1]
        for n, layer in model.layers.items():
            k = layer.attention.ops.rope(keys[int(n)].view(T, args.n_kv_heads, args.head_dim), *rope)
            held = last.slots[layer.attention.window][b]
            for slot, pos in enumerate(held):
                if pos is not None:
                    torch.testing.assert_close(cache[int(n)].k[b, :, slot], k[pos], atol=1e-5, rtol=1e-5)
    assert all(len(g) == max_tokens for g in gen)


def test_router_choices_rebuild_the_moe_output_exactly():
    args = preset("tiny-moe", n_layers=2)
    model = build_model(args, seed=4)
    calls = {int(n): [] for n in model.layers}
    hooks = [layer.feed_forward.register_forward_hook(
        lambda m, i, o, l=int(n): calls[l].append((i[0].clone(), o.clone()))) for n, layer in model.layers.items()]
    trace = Trace()
    record_run(model, [9, 5], None, 4, 3, trace)
    for h in hooks:
        h.remove()
    steps = [s for s in trace.steps if s.router]
    assert len(steps) == len(trace.steps) == len(calls[0])
    k = args.moe.num_experts_per_tok
    with torch.inference_mode():
        for n, layer in model.layers.items():
            for st, (x, out) in zip(steps, calls[int(n)], strict=True):
                chosen, weights = (torch.tensor(v) for v in st.router[int(n)])
                assert chosen.shape == (x.shape[0], k)
                assert torch.equal(analysis.rebuild_moe(layer.feed_forward, x, chosen, weights), out)
    data = trace.to_json("moe")
    n_tokens = len(data["tokens"])
    assert n_tokens == sum(sum(s.lengths) for s in trace.steps)
    for load in analysis.expert_loads(data, args.moe.num_experts):
        assert sum(load) == k * n_tokens and len(load) == args.moe.num_experts
    assert all(0.0 <= p <= 1.0 for p in analysis.expert_persistence(data))


def test_json_shapes():
    _model, trace = _run("w3-chunk3")
    m = trace.to_json("masks")
    assert m["window"] == 3
    for st in m["steps"]:
        assert set(st) >= {"phase", "queries", "keys", "allowed"}
        assert len(st["allowed"]) == len(st["queries"]) and all(len(r) == len(st["keys"]) for r in st["allowed"])
        assert all(len(k) == 3 for k in st["keys"]) and all(a in (0, 1) for r in st["allowed"] for a in r)
    c = trace.to_json("cache")
    assert c["window"] == 3 and all(len(r) == 3 for s in c["steps"] for r in s["rows"])
    rf = analysis.receptive_field_from_trace(trace, token=(0, 6))
    assert rf["token"] == 6 and rf["reach"] == [[4, 6], [2, 6]]
    import json
    json.dumps([m, c, rf])


def test_pipeline_events_and_row_moves():
    t = Trace()
    t.on_pipeline_event(0, "F", 0, 0.0, 1.0)
    with pytest.raises(ValueError):
        t.on_pipeline_event(0, "X", 0, 0.0, 1.0)
    assert t.to_json("pipeline")["events"] == [{"rank": 0, "kind": "F", "micro_batch": 0, "start": 0.0, "end": 1.0}]
    _, trace = _run("w3-chunk3")
    trace.on_row_move(2, 0)
    assert trace._slots[3][0] == trace._slots[3][2]
