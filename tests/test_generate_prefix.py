"""Prefix reuse: a prompt that starts with a stored one continues from its pre-filled state, and answers as a cold
pre-fill does; where a window makes the stored state unusable, the prompt is pre-filled cold."""

import pytest
import torch

from sirocco import backends
from sirocco.cache import RollingCache
from sirocco.config import preset
from sirocco.generate.drafters import Draft
from sirocco.generate.engine import Engine
from sirocco.generate.prefix import Hit, PrefixStore, common_prefix
from sirocco.generate.sampling import SamplingParams
from sirocco.generate.speculation import ROW_EXACT_TOKENS, Speculation
from sirocco.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Windows of 6 against conversations of 40 to 70 tokens: the windowed layers' rings wrap many times over.
ARGS = {"window": preset("tiny", vocab_size=259, sliding_window=6),
        "no-window": preset("tiny", vocab_size=259, sliding_window=None),
        "mixed-windows": preset("tiny", vocab_size=259, n_layers=3, sliding_window=[6, None, 8]),
        "moe": preset("tiny-moe", vocab_size=259)}
WRAPS = {"window": True, "no-window": False, "mixed-windows": True, "moe": False}
MODELS: dict = {}
STORE = 2**24
GREEDY = SamplingParams(max_tokens=8)
SAMPLED = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=3)


def model_for(name, backend="torch"):
    """A random model, as built (the torch backend) or on the cpu backend (speculation needs its row-exact
    kernels): the same weights either way."""
    if (name, backend) not in MODELS:
        MODELS[name, backend] = build_model(ARGS[name], seed=21)
        if backend != "torch":
            backends.attach(MODELS[name, backend], backend)
    return MODELS[name, backend]


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def engine(name, chunk=8, store=STORE, rows=2, backend="torch", **kw):
    return Engine(model_for(name, backend), None, max_rows=rows, chunk_size=chunk, max_seq_len=160,
                  prefix_cache_bytes=store, **kw)


def cold(name, prompt, params, chunk=8):
    [c] = engine(name, chunk, store=0).generate([prompt], params)
    return c


def assert_same(warm, ref, bits=False):
    """The same tokens; log-probabilities with the same bits, or within the rounding that separates two chunkings
    of one prompt (a chunk's matrix products round by its number of rows: 5e-7 on these models, as a cold
    pre-fill in chunks of 4 against one of 64)."""
    assert warm.tokens == ref.tokens
    if bits:
        assert warm.logprobs == ref.logprobs
    else:
        torch.testing.assert_close(torch.tensor(warm.logprobs), torch.tensor(ref.logprobs), atol=1e-6, rtol=0)


# -- a conversation: every turn continues from the last one's prompt ----------------------------------------------
@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_conversation_longer_than_the_window_answers_as_cold_pre_fills_do(name, params):
    e = engine(name)
    prompt, previous = tokens(21, 1), 0
    for turn in range(3):
        before = e.stats.prefill_tokens
        [warm] = e.generate([prompt], params)
        assert_same(warm, cold(name, prompt, params))
        assert warm.cached_tokens == previous                  # the whole last prompt, nothing more
        assert e.stats.prefill_tokens - before == len(prompt) - previous
        previous = len(prompt)
        prompt = prompt + warm.tokens + tokens(7, 10 + turn)    # the answer re-sent, and the next message
    assert len(prompt) > 40 and e.prefix.stats.hits == 2
    assert len(e.prefix) == (3 if WRAPS[name] else 1)          # wrapped rings keep the earlier turns


@pytest.mark.parametrize("name", ARGS)
def test_a_warm_start_on_a_chunk_boundary_has_the_cold_bits(name):
    """The stored prompt is 3 chunks of 8: the continuation's chunks are the cold run's, so are its bits."""
    first = tokens(24, 2)
    a = cold(name, first, GREEDY)
    for prompt in (first + tokens(13, 3), first + a.tokens[:5] + tokens(11, 4)):
        for params in (GREEDY, SAMPLED):
            e = engine(name)
            e.generate([first], GREEDY)
            [warm] = e.generate([prompt], params)
            assert warm.cached_tokens == 24
            assert_same(warm, cold(name, prompt, params), bits=True)


@pytest.mark.parametrize("name", ARGS)
def test_a_request_that_diverges_inside_a_stored_prefix(name):
    """Without a window, the shared tokens are reused; where a window's ring has wrapped past the divergence,
    the prompt is pre-filled cold. Either way the answer is the cold one."""
    e = engine(name)
    stored = tokens(40, 5)
    e.generate([stored], GREEDY)
    for at in (39, 30, 17):     # inside the stored prompt: at its last token (its ring still serves), and before
        prompt = stored[:at] + tokens(9, at)
        [warm] = e.generate([prompt], GREEDY)
        assert warm.cached_tokens == (0 if WRAPS[name] and at < 39 else at)
        assert_same(warm, cold(name, prompt, GREEDY))


@pytest.mark.parametrize("name", ["window", "mixed-windows"])
def test_the_same_prompt_again_reuses_all_but_its_last_token_through_a_wrapped_ring(name):
    e = engine(name)
    prompt = tokens(33, 6)
    [first] = e.generate([prompt], SAMPLED)
    [again] = e.generate([prompt], SAMPLED)
    assert again.cached_tokens == 32 and first.cached_tokens == 0
    assert_same(again, first)
    # diverging at the stored prompt's last token also works (the ring holds what query 32 sees); earlier does not
    for n, reused in ((32, 32), (31, 0)):
        [c] = e.generate([prompt[:n] + tokens(4, n)], GREEDY)
        assert c.cached_tokens == reused
        assert_same(c, cold(name, prompt[:n] + tokens(4, n), GREEDY))


def test_the_window_rule_is_tight():
    """Restoring a wrapped ring below its lowest usable length would give a wrong answer: the fallback is needed."""
    e = engine("window")
    stored = tokens(33, 6)
    e.generate([stored], GREEDY)
    [entry] = list(e.prefix._lru)
    assert entry.lowest == 32
    for m in (32, 31):
        prompt = stored[:m] + tokens(4, m)
        e.prefix.lookup = lambda ids, m=m: Hit(entry, m)         # forced, past the store's own rule for m = 31
        [forced] = e.generate([prompt], GREEDY)
        ref = cold("window", prompt, GREEDY)
        if m == 32:
            assert_same(forced, ref)
        else:
            assert max(abs(a - b) for a, b in zip(forced.logprobs, ref.logprobs)) > 1e-3


@pytest.mark.parametrize("name", ["window", "no-window"])
def test_warm_starts_beside_other_requests_equal_their_cold_runs(name):
    """Rows restored while others pre-fill and decode, a row compacted after a finish: each request's answer is
    its cold one."""
    e = engine(name, chunk=5, rows=3, max_batch_tokens=9)
    base = [tokens(26, 7), tokens(30, 8)]
    e.generate(base, GREEDY)
    jobs = {"a": (base[0] + tokens(6, 9), SamplingParams(max_tokens=12)),
            "b": (tokens(11, 10), SamplingParams(max_tokens=4)),
            "c": (base[1] + tokens(3, 11), SAMPLED),
            "d": (base[0][:20] + tokens(5, 12), SamplingParams(max_tokens=6))}
    done = {}
    for rid, (p, sp) in jobs.items():
        e.add_request(p, sp, request_id=rid)
        for ev in e.step():
            if ev.completion is not None:
                done[ev.request_id] = ev.completion
    while e.has_unfinished():
        for ev in e.step():
            if ev.completion is not None:
                done[ev.request_id] = ev.completion
    assert done["a"].cached_tokens == 26 and done["c"].cached_tokens == 30 and done["b"].cached_tokens == 0
    assert done["d"].cached_tokens == (0 if WRAPS[name] else 20)
    for rid, (p, sp) in jobs.items():
        ref = cold(name, p, sp, chunk=5)
        assert done[rid].tokens == ref.tokens
        torch.testing.assert_close(torch.tensor(done[rid].logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)


def test_a_prompt_is_stored_once_its_first_token_is_out_or_before_its_row_is_freed():
    e = engine("no-window", chunk=64)
    e.add_request(tokens(20, 1), SamplingParams(max_tokens=3), request_id="a")
    assert [ev.request_id for ev in e.step()] == ["a"] and len(e.prefix) == 0     # the copy waits for the next step
    e.step()
    assert len(e.prefix) == 1
    e.add_request(tokens(20, 2), SamplingParams(max_tokens=1), request_id="b")     # done in the step that pre-fills it
    e.step()
    assert len(e.prefix) == 2
    e.add_request(tokens(20, 3), SamplingParams(max_tokens=5), request_id="c")
    e.add_request(tokens(20, 4), SamplingParams(max_tokens=5), request_id="d")
    e.step()
    e.abort("c")                                 # its row is freed and row 1 moves into it: both stored before
    assert len(e.prefix) == 4
    while e.has_unfinished():
        e.step()
    for i, p in enumerate([tokens(20, 3), tokens(20, 4)]):
        [c] = e.generate([p + [7, 8]], GREEDY)
        assert c.cached_tokens == 20
        assert_same(c, cold("no-window", p + [7, 8], GREEDY))


def test_without_a_store_nothing_is_kept():
    e = engine("window", store=0)
    p = tokens(30, 1)
    e.generate([p], GREEDY)
    [c] = e.generate([p + [5, 6]], GREEDY)
    assert e.prefix is None and c.cached_tokens == 0 and e.stats.cached_tokens == 0


# -- with speculative decoding: rings of W + k slots, drafts on restored rows ----------------------------------------
FLAT = [1.0] * ROW_EXACT_TOKENS          # a cost curve on which drafting always pays
K = 3                                    # draft tokens: windowed rings of W + 3 slots


def spec_engine(name, drafter=None, store=STORE):
    """Chunks of 8; without a drafter, plain decoding (no spare slots) on the same backend."""
    speculation = None if drafter is None else Speculation(drafter, draft_tokens=K, cost_curve=FLAT)
    return engine(name, store=store, backend="cpu", speculation=speculation)


class EveryThirdWrong:
    """Proposes each sequence's known continuation with every third generated position wrong: rows accept and roll
    back, the same way whatever ran before (a drafter of seeded draws would depend on the order of its calls)."""

    costly = False

    def __init__(self, continuations):
        self.continuations = continuations

    def propose(self, requests):
        out = []
        for r in requests:
            known, g = self.continuations.get(tuple(r.prompt), []), len(r.generated)
            out.append(Draft([t if (g + i) % 3 != 2 else (t + 1) % 259 for i, t in enumerate(known[g:g + r.k])]))
        return out

    def release(self, key):
        pass

    def move_row(self, src, dst):
        pass


def plain_runs(name, prompts, params):
    """Each prompt's plain (not speculative, no store) completion, and a drafter of them, every third wrong."""
    plain = spec_engine(name, store=0)
    done = {tuple(p): plain.generate([p], params)[0] for p in prompts}
    return done, EveryThirdWrong({p: c.tokens for p, c in done.items()})


class Steps:
    """A RowObserver keeping (first position, tokens brought, cached after) of each step of its request."""

    def __init__(self):
        self.steps = []

    def on_row_step(self, step):
        self.steps.append((step.start, len(step.tokens), step.cached))


def observed(e, prompt, params=GREEDY):
    """Run one request alone, observed: its completion and its steps."""
    seen = Steps()
    e.add_request(prompt, params, observer=seen)
    done = None
    while e.has_unfinished():
        for ev in e.step():
            done = ev.completion or done
    return done, seen.steps


@pytest.mark.parametrize("name", ["window", "mixed-windows"])
def test_with_spare_slots_a_wrapped_ring_serves_k_more_positions_back(name):
    """With k = 3 spare slots a window-6 ring has S = 9: the 33-token stored prompt's ring holds positions 24..32,
    so a request may continue from any m >= 33 - 1 - (9 - 6) = 29 (the window of query m, m - 5..m, is there), not
    only from 32 or 33 as on a ring of 6; below 29 it is pre-filled cold. Warm answers with drafts verified and
    rolled back on the restored row equal cold speculative ones and plain decoding's."""
    stored = tokens(33, 6)
    reuse = {33: 33, 32: 32, 30: 30, 29: 29, 28: 0}
    prompts = [stored[:m] + tokens(5, 40 + m) for m in reuse]
    plain, drafter = plain_runs(name, [stored, *prompts], GREEDY)
    e = spec_engine(name, drafter)
    assert e.cache.size_for(6) == 6 + K and e.prefix is not None
    e.generate([stored], GREEDY)
    [entry] = list(e.prefix._lru)
    assert entry.lowest == 29
    cold = spec_engine(name, drafter, store=0)
    proposed = accepted = 0
    for (m, reused), prompt in zip(reuse.items(), prompts):
        warm, warm_steps = observed(e, prompt)
        ref, cold_steps = observed(cold, prompt)
        assert warm.cached_tokens == reused and warm_steps[0][0] == reused
        # after its pre-fill, the restored row decodes, drafts and rolls back step for step as the cold one
        decodes = [[st for st in steps if st[0] >= len(prompt)] for steps in (warm_steps, cold_steps)]
        assert decodes[0] == decodes[1] and any(n > 1 for _, n, _ in decodes[0])
        assert_same(warm, ref, bits=m in (0, 32))         # 32: the continuation's chunks are the cold run's
        assert_same(ref, plain[tuple(prompt)], bits=True)  # speculation's own promise, beside
        proposed, accepted = proposed + warm.proposed_tokens, accepted + warm.accepted_tokens
    assert 0 < accepted < proposed                        # drafts were verified, some rolled back
    # the rule is tight: forced below it, the ring no longer holds the window of the first query
    m = 28
    e.prefix.lookup = lambda ids: Hit(entry, m)
    [forced] = e.generate([prompts[-1]], GREEDY)
    ref = plain[tuple(prompts[-1])]
    assert forced.cached_tokens == m
    assert max(abs(a - b) for a, b in zip(forced.logprobs, ref.logprobs)) > 1e-3


@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_speculative_conversation_continues_from_each_prompt_and_drafts_on_the_restored_row(name, params):
    """Only pre-filled prompts are stored, so drafts and their rollback never reach the store: each turn restores
    the last turn's prompt, drafts on the restored row from its first decode steps, and answers as plain decoding
    does (greedy and seeded: the drafter gives no distribution, so sampled rows keep their draws)."""
    turns, prompt = [], tokens(21, 1)
    plain = spec_engine(name, store=0)
    for turn in range(3):
        [c] = plain.generate([prompt], params)
        turns.append((prompt, c))
        prompt = prompt + c.tokens + tokens(7, 10 + turn)
    e = spec_engine(name, EveryThirdWrong({tuple(p): c.tokens for p, c in turns}))
    previous = 0
    for prompt, want in turns:
        before = e.stats.prefill_tokens
        [warm] = e.generate([prompt], params)
        assert warm.cached_tokens == previous and e.stats.prefill_tokens - before == len(prompt) - previous
        assert_same(warm, want)
        assert warm.proposed_tokens > 0 and warm.accepted_tokens > 0
        previous = len(prompt)
    assert e.prefix.stats.hits == 2 and e.stats.accepted_tokens < e.stats.proposed_tokens


# -- the store itself ------------------------------------------------------------------------------------------
def store_for(args, budget, min_tokens=4, rows=2):
    cache = RollingCache(args, rows=rows, max_seq_len=64)
    for layer in cache.layers.values():
        layer.k.normal_()
        layer.v.normal_()
    return cache, PrefixStore(cache, args.n_kv_heads, args.head_dim, budget, min_tokens=min_tokens)


def test_restore_copies_the_exact_slots_per_layer():
    args = preset("tiny", n_layers=3, sliding_window=[4, None, 8])
    cache, store = store_for(args, 2**20)
    seq = list(range(10, 20))                       # 10 tokens: the window-4 ring has wrapped, the window-8 ring too
    store.save(seq, row=0)
    assert store.lowest(10) == 9 and store.lowest(4) == 0
    hit = store.lookup(seq + [1, 2])
    assert hit is not None and hit.tokens == 10
    store.restore(hit, row=1)
    for i, layer in cache.layers.items():
        n = layer.size if i in (0, 2) else 10       # rings whole; the layer without a window its first 10 slots
        assert torch.equal(layer.k[1, :, :n], layer.k[0, :, :n]) and torch.equal(layer.v[1, :, :n], layer.v[0, :, :n])
        if i == 1:
            assert not torch.equal(layer.k[1, :, n:], layer.k[0, :, n:])     # nothing past the stored positions
    assert store.lookup(seq[:8] + [0, 0, 0]) is None     # diverges at 8 < 9: the window-4 ring lost position 5
    assert store.stats.queries == 2 and store.stats.hits == 1 and store.stats.hit_tokens == 10


def test_budget_least_recently_used_and_contained_prompts():
    args = preset("tiny", sliding_window=None)
    cache, store = store_for(args, 0)
    per_token = store.cost(1)
    assert per_token == args.n_layers * 2 * args.n_kv_heads * args.head_dim * 4      # fp32 keys and values
    store.budget = 30 * per_token
    a, b, c = list(range(100, 110)), list(range(200, 212)), list(range(300, 309))
    store.save(a, 0)
    store.save(b, 0)
    assert store.nbytes == 22 * per_token and len(store) == 2
    assert store.lookup(a + [1]).tokens == 10        # a is now the most recently used
    store.save(c, 0)                                 # 31 tokens for 30 tokens' room: b goes, not a
    assert store.lookup(b + [1]) is None and store.lookup(a + [1]) is not None and store.stats.evicted == 1
    store.save(a + [7, 8, 9], 0)                     # extends a: a is dropped, its prefixes served by the new one
    assert len(store) == 2 and store.nbytes == 22 * per_token
    assert store.lookup(a + [1]).tokens == 10 and store.lookup(a[:6] + [1]).tokens == 6
    store.save(a[:7], 0)                             # contained in a stored state: nothing new
    assert len(store) == 2 and store.stats.saved == 4
    store.save(list(range(400, 431)), 0)             # over the whole budget: not stored, nothing evicted
    assert len(store) == 2
    store.clear()
    assert len(store) == 0 and store.nbytes == 0


def test_short_prompts_and_the_last_token():
    cache, store = store_for(preset("tiny", sliding_window=None), 2**20, min_tokens=4)
    store.save([1, 2, 3], 0)                         # shorter than min_tokens: not worth keeping
    assert len(store) == 0
    store.save([1, 2, 3, 4, 5], 0)
    assert store.lookup([1, 2, 3, 4, 5]).tokens == 4    # the last prompt token is always pre-filled
    assert store.lookup([1, 2, 3, 4]) is None            # 3 reusable tokens: fewer than min_tokens
    assert store.lookup([1, 2, 3, 9, 9, 9]) is None


def test_common_prefix():
    assert common_prefix((1, 2, 3), (1, 2, 3)) == 3
    assert common_prefix(tuple(range(1000)), tuple(range(777)) + (0,)) == 777
    assert common_prefix((5,), (6,)) == 0
