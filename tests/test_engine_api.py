"""The engine as a service: requests added and aborted between steps, FCFS admission, mixed steps."""

import math

import pytest
import torch

from sirocco.config import preset
from sirocco.errors import SiroccoError
from sirocco.generate.engine import Engine, PromptTooLong
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# A window of 6 against sequences of up to ~30 tokens: the window layers' cache rows roll.
ARGS = {"mistral": preset("tiny", vocab_size=259, sliding_window=6),
        "mixtral": preset("tiny-moe", vocab_size=259)}
MODELS = {}


def model_for(name):
    if name not in MODELS:
        MODELS[name] = build_model(ARGS[name], seed=21)
    return MODELS[name]


def prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def alone(model, p, params):
    [c] = Engine(model, None, max_rows=1, chunk_size=64, max_seq_len=64, mixed=False).generate([p], params)
    return c


def drain(engine, done=None, phases=None):
    """Step until idle; returns {request_id: completion}."""
    done = {} if done is None else done
    while engine.has_unfinished():
        for e in engine.step():
            if e.completion is not None:
                done[e.request_id] = e.completion
    return done


def record_phases(engine):
    """Wrap the scheduler so every step's phase is appended to the returned list."""
    phases, schedule = [], engine.scheduler.schedule

    def wrapped():
        step = schedule()
        if step is not None:
            phases.append(step.phase)
        return step
    engine.scheduler.schedule = wrapped
    return phases


def assert_same(c, ref):
    assert c.tokens == ref.tokens
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARGS)
def test_requests_added_between_steps_join_the_batch_and_equal_alone(name):
    model = model_for(name)
    engine = Engine(model, None, max_rows=4, chunk_size=4, max_seq_len=64)
    phases = record_phases(engine)
    reqs = {"a": (prompt(5, 1), SamplingParams(max_tokens=14)),
            "b": (prompt(19, 2), SamplingParams(max_tokens=6)),
            "c": (prompt(2, 3), SamplingParams(max_tokens=9, temperature=0.8, seed=7))}
    assert engine.add_request(*reqs["a"], request_id="a") == "a"
    for _ in range(4):
        engine.step()
    assert engine.num_running == 1
    engine.add_request(*reqs["b"], request_id="b")     # a long prompt arrives while "a" decodes
    engine.add_request(*reqs["c"], request_id="c")
    assert engine.num_waiting == 2
    done = drain(engine)
    assert "mixed" in phases
    for rid, (p, sp) in reqs.items():
        assert_same(done[rid], alone(model, p, sp))
        assert done[rid].request_id == rid


def test_decode_is_not_stalled_by_a_long_prompt():
    engine = Engine(model_for("mistral"), None, max_rows=2, chunk_size=4, max_seq_len=64, max_batch_tokens=5)
    engine.add_request(prompt(3, 1), SamplingParams(max_tokens=20), request_id="a")
    engine.step()                                      # "a" pre-filled, first token out
    engine.add_request(prompt(25, 2), SamplingParams(max_tokens=2), request_id="b")
    for _ in range(7):                                 # 25 prompt tokens at 4 per step: 7 steps of pre-fill
        assert [e.request_id for e in engine.step()][:1] == ["a"]


def test_abort_of_a_running_request_frees_its_row_at_once():
    model = model_for("mistral")
    engine = Engine(model, None, max_rows=2, chunk_size=4, max_seq_len=64)
    ps = {r: prompt(4 + i, i) for i, r in enumerate("abc")}
    for r in "abc":
        engine.add_request(ps[r], SamplingParams(max_tokens=10), request_id=r)
    for _ in range(3):
        engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    assert engine.abort("a") is True
    assert (engine.num_running, engine.num_waiting) == (1, 1)        # the row is free before the next step
    events = engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 0      # "c" took the row in that step
    first = events[0]
    assert first.request_id == "a" and first.token is None and first.completion.finish_reason == "abort"
    assert len(first.completion.tokens) == 3
    assert engine.abort("a") is False and engine.abort("nope") is False
    done = drain(engine)
    assert "a" not in done
    for r in "bc":                                    # "b" moved from row 1 to row 0: still exact
        assert_same(done[r], alone(model, ps[r], SamplingParams(max_tokens=10)))


def test_abort_of_a_waiting_request():
    model = model_for("mixtral")
    engine = Engine(model, None, max_rows=1, max_seq_len=64)
    a = engine.add_request(prompt(4, 1), SamplingParams(max_tokens=3))
    b = engine.add_request(prompt(4, 2), SamplingParams(max_tokens=3))
    assert a != b and engine.num_waiting == 2
    engine.step()
    assert engine.abort(b) and engine.num_waiting == 0
    events = engine.step()
    assert events[0].request_id == b and events[0].completion.finish_reason == "abort"
    assert events[0].completion.tokens == []
    done = drain(engine)
    assert set(done) == {a} and done[a].finish_reason == "length"


def test_fcfs_admission_and_max_rows():
    engine = Engine(model_for("mistral"), None, max_rows=2, chunk_size=8, max_seq_len=64)
    ids = [engine.add_request(prompt(3 + i, i), SamplingParams(max_tokens=m)) for i, m in enumerate([2, 6, 3, 1, 4])]
    admitted = []
    while engine.has_unfinished():
        events = engine.step()
        assert engine.num_running <= 2
        for r in [e.request_id for e in events] + [s.request_id for s in engine.scheduler.running]:
            if r not in admitted:
                admitted.append(r)
    assert admitted == ids


def test_a_waiting_request_takes_a_freed_row_at_the_next_step():
    engine = Engine(model_for("mistral"), None, max_rows=1, max_seq_len=64)
    a = engine.add_request(prompt(3, 1), SamplingParams(max_tokens=2))
    b = engine.add_request(prompt(3, 2), SamplingParams(max_tokens=2))
    assert [e.request_id for e in engine.step()] == [a]
    ev = engine.step()
    assert [(e.request_id, e.completion is not None) for e in ev] == [(a, True)]
    assert (engine.num_running, engine.num_waiting) == (0, 1)
    assert [e.request_id for e in engine.step()] == [b]          # admitted and pre-filled in one step


MIXES = {  # prompt lengths, max tokens, chunk size, max batch tokens, rows
    "staggered": ([3, 17, 8, 1, 12], [12, 5, 15, 9, 1], 5, 8, 3),
    "long-behind-short": ([2, 2, 30], [20, 20, 4], 4, 6, 3),
    "tight-budget": ([9, 14, 4, 11], [7, 3, 10, 6], 3, 4, 4),
}


@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("mix", MIXES)
def test_mixed_steps_give_what_separate_steps_give(name, mix):
    lengths, max_tokens, chunk, budget, rows = MIXES[mix]
    model = model_for(name)
    prompts = [prompt(n, i) for i, n in enumerate(lengths)]
    params = [SamplingParams(max_tokens=m) for m in max_tokens]
    runs = {}
    for mixed in (True, False):
        engine = Engine(model, None, max_rows=rows, chunk_size=chunk, max_seq_len=64, max_batch_tokens=budget,
                        mixed=mixed)
        phases = record_phases(engine)
        runs[mixed] = engine.generate(prompts, params)
        assert ("mixed" in phases) == mixed
    for c, ref in zip(runs[True], runs[False], strict=True):
        assert_same(c, ref)


@pytest.mark.parametrize("name", ARGS)
def test_a_seeded_sampled_request_is_the_same_alone_and_with_others(name):
    model = model_for(name)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=3)
    p = prompt(7, 9)
    engine = Engine(model, None, max_rows=3, chunk_size=3, max_seq_len=64, max_batch_tokens=5)
    engine.add_request(prompt(11, 1), SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    engine.step()
    engine.step()
    rid = engine.add_request(p, sp)
    engine.add_request(prompt(5, 2), SamplingParams(max_tokens=15))
    done = drain(engine)
    assert_same(done[rid], alone(model, p, sp))


def test_idle_step_returns_nothing():
    engine = Engine(model_for("mistral"), None, max_rows=2, max_seq_len=32)
    assert engine.step() == [] and not engine.has_unfinished()
    assert (engine.num_running, engine.num_waiting) == (0, 0)


def test_add_request_errors_queue_nothing():
    engine = Engine(model_for("mistral"), None, max_rows=2, max_seq_len=32)
    with pytest.raises(PromptTooLong, match=r"has 40 tokens; the limit is 31"):
        engine.add_request(list(range(3, 43)))
    with pytest.raises(SiroccoError, match="empty"):
        engine.add_request([])
    with pytest.raises(SiroccoError, match="outside the vocabulary of 259: \\[259, 999\\]"):
        engine.add_request([5, 259, 999])
    with pytest.raises(SiroccoError, match="tokenizer"):
        engine.add_request("text without a tokenizer")
    assert (engine.num_waiting, engine.has_unfinished()) == (0, False)
    rid = engine.add_request([5, 6], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([7], request_id="x")
    assert engine.num_waiting == 1
    done = drain(engine)
    assert list(done) == [rid] and done[rid].index == 0
    assert engine.add_request([5, 6], request_id="x") == "x"        # a finished id may be used again


def test_stream_needs_an_idle_engine_and_generate_keeps_prompt_indices():
    engine = Engine(model_for("mistral"), None, max_rows=2, max_seq_len=32)
    out = engine.generate([prompt(3, 1), prompt(4, 2), prompt(2, 3)], SamplingParams(max_tokens=3))
    assert [c.index for c in out] == [0, 1, 2] and len({c.request_id for c in out}) == 3
    engine.add_request([5, 6])
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate([[5, 6]])
    drain(engine)
    # leaving a stream early aborts what it started and leaves the engine idle
    for _ in engine.stream([prompt(3, 1), prompt(4, 2), prompt(2, 3)], SamplingParams(max_tokens=5)):
        break
    assert not engine.has_unfinished() and engine.step() == []


@pytest.mark.parametrize("window", [6, None])
def test_a_decode_row_in_a_mixed_step_gets_the_bits_of_a_decode_step(window):
    """The attention of a one-token row is computed by the decode op in a mixed step too (the pre-fill op's
    SDPA differs in the last bits for the same row): bit for bit what a pure decode step gives."""
    import copy

    from sirocco.cache import RollingCache
    from sirocco.model.attention import REFERENCE_OPS, attend
    from sirocco.plan import BatchPlan

    args = preset("tiny", vocab_size=259, sliding_window=window)
    H, G, D = args.n_heads, args.n_kv_heads, args.head_dim
    cache = RollingCache(args, rows=3, max_seq_len=64)
    layer = cache[0]
    layer.k.normal_()
    layer.v.normal_()
    lens = cache.cache_lens()
    q, k, v = torch.randn(7, H, D), torch.randn(7, G, D), torch.randn(7, G, D)
    decode = BatchPlan.build([1, 1], starts=[9, 4], rows=[1, 0], windows=[window], cache_lens=lens)
    mixed = BatchPlan.build([1, 1, 5], starts=[9, 4, 3], rows=[1, 0, 2], windows=[window], cache_lens=lens)
    assert mixed.for_window(window).parts is not None
    alone = attend(q[:2], k[:2], v[:2], decode.for_window(window), copy.deepcopy(layer), REFERENCE_OPS)
    together = attend(q, k, v, mixed.for_window(window), copy.deepcopy(layer), REFERENCE_OPS)
    assert torch.equal(alone, together[:2])
    # ... and the pre-fill rows are what a pre-fill step of them alone gives
    prefill = BatchPlan.build([5], starts=[3], rows=[2], windows=[window], cache_lens=lens)
    assert torch.equal(attend(q[2:], k[2:], v[2:], prefill.for_window(window), copy.deepcopy(layer), REFERENCE_OPS),
                       together[2:])


# -- the sampling seam through the engine: processors, top-k, the constraint's view of the tokens ----------------
def full_logprobs(model, tokens):
    """log_softmax of the logits at every position of ``tokens``, recomputed without a cache."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(tokens), [len(tokens)]).float(), dim=-1)


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_logit_bias_and_top_logprobs_through_the_engine(name):
    model = model_for(name)
    p = prompt(11, 3)
    engine = Engine(model, None, max_rows=2, chunk_size=4, max_seq_len=64)
    plain, biased = engine.generate([p, p], [SamplingParams(max_tokens=8, logprobs=3),
                                             SamplingParams(max_tokens=8, logit_bias={42: 100.0}, logprobs=2)])
    assert biased.tokens == [42] * 8
    ref = full_logprobs(model, p + biased.tokens)
    for i, (t, lp) in enumerate(zip(biased.tokens, biased.logprobs, strict=True)):
        assert math.isclose(lp, float(ref[len(p) - 1 + i, t]), abs_tol=1e-5)      # the unbiased distribution
    ref = full_logprobs(model, p + plain.tokens)
    assert len(plain.top_logprobs) == len(plain.tokens)
    for i, (t, top) in enumerate(zip(plain.tokens, plain.top_logprobs, strict=True)):
        values, ids = ref[len(p) - 1 + i].topk(3)
        assert [a for a, _ in top] == ids.tolist() and top[0][0] == t
        assert all(math.isclose(a, float(b), abs_tol=1e-5) for (_, a), b in zip(top, values, strict=True))
    assert "top_logprobs" in plain.to_json() and "top_logprobs" not in alone(model, p, SamplingParams(
        max_tokens=2)).to_json()


class EvenOnly:
    """A constraint: even token ids only; its processors remember what they were told."""

    def __init__(self):
        self.made: list = []                   # this constraint's own, not shared by every EvenOnly

    def processor(self, tokenizer, vocab_size):
        from sirocco.generate.sampling import AllowedTokens

        class Told(AllowedTokens):
            def __init__(self):
                super().__init__(range(0, vocab_size, 2), vocab_size)
                self.accepted = []

            def accept(self, tokens):
                self.accepted += tokens

        self.made.append(Told())
        return self.made[-1]


def test_a_constraint_masks_its_row_only_and_is_told_every_kept_token():
    model = model_for("mistral")
    constraint = EvenOnly()
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, constraint=constraint)
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=4)
    engine = Engine(model, None, max_rows=2, chunk_size=5, max_seq_len=64)
    constrained, beside = engine.generate([prompt(9, 1), prompt(7, 2)], [params, free])
    assert all(t % 2 == 0 for t in constrained.tokens)
    assert constraint.made[0].accepted == constrained.tokens
    assert beside.tokens == alone(model, prompt(7, 2), free).tokens           # the free row beside it is untouched


def test_logit_bias_outside_the_vocabulary_is_refused_when_added():
    engine = Engine(model_for("mistral"), None, max_rows=1, max_seq_len=64)
    with pytest.raises(SiroccoError, match="outside the vocabulary of 259"):
        engine.add_request([5, 6], SamplingParams(logit_bias={300: 1.0}))
