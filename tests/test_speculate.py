"""Speculative decoding: the same output as plain decoding (greedy: bit for bit; sampled: the same draws where the
drafter gives no distribution, the target's distribution where it does), the rolled-back cache equal to a plain
decode's, the drafters, the rule that chooses how many drafts a step takes, and the structured-output seam."""

import math

import pytest
import torch

from sirocco import backends
from sirocco.config import preset
from sirocco.errors import SiroccoError
from sirocco.generate.drafters import Draft, DraftRequest, KnownDrafter, ModelDrafter, NgramDrafter, NgramIndex
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import LogitsProcessor, SamplingParams, filter_logits
from sirocco.generate.speculation import ROW_EXACT_TOKENS, RowSpeculation, Speculation, Speculator
from sirocco.model import build_model
from sirocco.viz import Trace

from fakes import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Window 6 against sequences of up to ~40 tokens: the dense rows' rings wrap many times while drafting; the MoE
# model has no window; the third mixes windows of 4, none and 8 over its layers.
ARGS = {"mistral": preset("tiny", vocab_size=259, sliding_window=6),
        "mixtral": preset("tiny-moe", vocab_size=259),
        "mixed-windows": preset("tiny", vocab_size=259, n_layers=3, sliding_window=[4, None, 8])}
MODELS: dict = {}
FLAT = [1.0] * ROW_EXACT_TOKENS          # a cost curve on which drafting always pays: every step drafts


def model_for(name, seed=21):
    """A random model on the cpu backend (speculation needs its row-exact kernels; plain decoding runs it too)."""
    if (name, seed) not in MODELS:
        MODELS[name, seed] = build_model(ARGS[name], seed=seed)
        backends.attach(MODELS[name, seed], "cpu")
    return MODELS[name, seed]


def prompts_for(seed=0):
    """Three prompts, one longer than the window, with repeats for prompt lookup to find."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 259, (4,), generator=g).tolist()
    return [motif * 3 + torch.randint(3, 259, (2,), generator=g).tolist(),
            torch.randint(3, 259, (5,), generator=g).tolist(), motif + [9] + motif]


def run(model, prompts, params, speculation=None, chunk_size=4, max_rows=4, tokenizer=None, trace=None):
    engine = Engine(model, tokenizer, max_rows=max_rows, chunk_size=chunk_size, max_seq_len=96,
                    speculation=speculation, trace=trace)
    return engine.generate(prompts, params), engine


def known_drafter(model, prompts, params, p, seed=0, **kw):
    """A drafter of the plain run's own continuation, each token right with probability p."""
    plain, _ = run(model, prompts, params, **kw)
    return KnownDrafter({tuple(q): c.tokens for q, c in zip(prompts, plain)}, model.args.vocab_size, p=p, seed=seed)


def assert_identical(got, want):
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        assert g.logprobs == w.logprobs                                  # the same float bits
        assert g.finish_reason == w.finish_reason


GREEDY = SamplingParams(max_tokens=24, stop_on_eos=False)
SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=5, stop_on_eos=False)


# -- the same output ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("chunk", [3, 16])
@pytest.mark.parametrize("drafter", ["ngram", "known", "model"])
def test_greedy_output_is_plain_decoding_bit_for_bit(name, chunk, drafter):
    """Three packed prompts (one longer than the window, chunks shorter and longer than it), drafts accepted and
    rejected after the ring has wrapped: tokens and log-probabilities equal plain decoding's bits."""
    model = model_for(name)
    prompts = prompts_for()
    plain, _ = run(model, prompts, GREEDY, chunk_size=chunk)
    source = {"ngram": "ngram", "model": model_for(name, seed=22),
              "known": known_drafter(model, prompts, GREEDY, p=0.6, chunk_size=chunk)}[drafter]
    spec, engine = run(model, prompts, GREEDY, Speculation(source, draft_tokens=3, cost_curve=FLAT), chunk_size=chunk)
    assert_identical(spec, plain)
    st = engine.stats
    assert st.draft_steps > 0 and st.proposed_tokens > 0
    if drafter == "known":                                # both outcomes happened, so both paths were checked
        assert 0 < st.accepted_tokens < st.proposed_tokens
    assert sum(c.proposed_tokens for c in spec) == st.proposed_tokens
    assert sum(c.accepted_tokens for c in spec) == st.accepted_tokens


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_sampled_rows_with_prompt_lookup_keep_their_draws(name):
    """A drafter without distributions (q one-hot): the row draws its own token at each position with its
    generator, as plain decoding does, so a seeded row keeps its very tokens."""
    model = model_for(name)
    prompts = prompts_for(1)
    plain, _ = run(model, prompts, SAMPLED)
    drafter = known_drafter(model, prompts, SAMPLED, p=0.7)
    spec, engine = run(model, prompts, SAMPLED, Speculation(drafter, draft_tokens=4, cost_curve=FLAT))
    assert_identical(spec, plain)
    assert 0 < engine.stats.accepted_tokens < engine.stats.proposed_tokens


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_a_draft_model_equal_to_the_target_accepts_everything(name):
    model = model_for(name)
    prompts = prompts_for(2)[:1]
    plain, _ = run(model, prompts, GREEDY)
    spec, engine = run(model, prompts, GREEDY, Speculation(model, draft_tokens=3, cost_curve=FLAT))
    assert_identical(spec, plain)
    assert engine.stats.proposed_tokens > 10
    assert engine.stats.accepted_tokens == engine.stats.proposed_tokens


def test_a_draft_model_rolls_back_with_the_target():
    """The target biases a few tokens, so the draft model (the target itself, unbiased) is sometimes wrong: after
    each rejection its cache rolls back to the accepted prefix, and its next drafts are again the unbiased greedy
    continuation of the sequence as it now is (recomputed without a cache)."""
    model = model_for("mistral")
    bias = {t: 1.5 for t in range(3, 259, 7)}
    params = SamplingParams(max_tokens=30, stop_on_eos=False, logit_bias=bias)
    drafter = ModelDrafter(model, max_rows=1, max_seq_len=96, draft_tokens=3)
    seen: list[tuple[list[int], list[int]]] = []

    class Recording:
        costly = True

        def propose(self, requests):
            out = drafter.propose(requests)
            for r, d in zip(requests, out):
                seen.append(([r.token(i) for i in range(len(r))], d.tokens))
            return out

        def release(self, key):
            drafter.release(key)

        def move_row(self, src, dst):
            drafter.move_row(src, dst)

    prompt = prompts_for(3)[0]
    plain, _ = run(model, [prompt], params)
    spec, engine = run(model, [prompt], params, Speculation(Recording(), draft_tokens=3, cost_curve=FLAT,
                                                            draft_cost_curve=[1e-9] * ROW_EXACT_TOKENS))
    assert_identical(spec, plain)
    assert 0 < engine.stats.accepted_tokens < engine.stats.proposed_tokens
    with torch.no_grad():
        for context, tokens in seen:
            seq = list(context)
            for t in tokens:
                assert t == int(model(torch.tensor(seq), [len(seq)])[-1].argmax())
                seq.append(t)


# -- the distribution ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sampled_output_keeps_the_target_distribution():
    """With a draft model's distributions (the rejection rule), the second token of thousands of seeded requests
    is distributed as the target's: a chi-square test against the exact distribution, with and without
    speculation."""
    args = preset("tiny", vocab_size=12, sliding_window=6)
    target, draft = build_model(args, seed=1), build_model(args, seed=2)
    with torch.no_grad():          # sharpen the tiny random models so that p and q differ in earnest
        target.output.weight.mul_(40)
        draft.output.weight.mul_(40)
    backends.attach(target, "cpu")
    prompt, temperature, n = [3, 5, 7, 2], 1.0, 3000
    with torch.no_grad():
        first = torch.softmax(filter_logits(target(torch.tensor(prompt), [4])[-1], temperature, 0, 1.0), -1)
        expected = torch.zeros(12)
        for t1 in range(12):
            after = target(torch.tensor(prompt + [t1]), [5])[-1]
            expected += first[t1] * torch.softmax(filter_logits(after, temperature, 0, 1.0), -1)
    counts = {}
    for label, speculation in [("plain", None),
                               ("speculative", Speculation(draft, draft_tokens=3, cost_curve=FLAT,
                                                           draft_cost_curve=[1e-9] * ROW_EXACT_TOKENS))]:
        engine = Engine(target, None, max_rows=2, chunk_size=8, max_seq_len=16, speculation=speculation)
        params = [SamplingParams(max_tokens=3, temperature=temperature, seed=s, stop_on_eos=False) for s in range(n)]
        done = engine.generate([prompt] * n, params)
        counts[label] = torch.bincount(torch.tensor([c.tokens[1] for c in done]), minlength=12).double()
        if speculation is not None:
            assert 0 < engine.stats.accepted_tokens < engine.stats.proposed_tokens
    common = n * expected >= 5                     # the tokens expected fewer than 5 times share one cell
    rare = [~common] if bool((~common).any()) else []
    want = torch.cat([n * expected[common]] + [n * expected[m].sum()[None] for m in rare])
    for label, c in counts.items():
        got = torch.cat([c[common]] + [c[m].sum()[None] for m in rare])
        chi2 = float(((got - want) ** 2 / want).sum())
        # len(want) - 1 degrees of freedom (at most 11): P(chi2 > 31.3) = 0.001 at 11, less with fewer
        assert chi2 < 31.3, (label, chi2, got.tolist(), want.tolist())


# -- the rolled-back cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spare", [False, True])
def test_after_any_mix_of_accepted_and_rejected_drafts_the_cache_is_a_plain_decodes(spare):
    """Step by step, whenever a speculative row holds as many tokens as a plain decode's, every position still in
    its window is in the slot of that position (the trace's slot -> position map), with the same key and value
    bits as the plain decode's cache (on a ring of exactly the window, or with the same spare slots); the slots
    of positions the row does not hold are rejected drafts, rolled back. Two packed rows, window 6."""
    model = model_for("mistral")
    prompts = prompts_for(4)[:2]
    params = SamplingParams(max_tokens=30, stop_on_eos=False)
    drafter = known_drafter(model, prompts, params, p=0.5, seed=3)
    # the plain decode's cache rows after every step, by (request, tokens cached)
    plain_spec = Speculation(KnownDrafter({}, 259), draft_tokens=3, cost_curve=FLAT) if spare else None
    plain = Engine(model, None, max_rows=2, chunk_size=4, max_seq_len=96, speculation=plain_spec)
    for p in prompts:
        plain.add_request(p, params)
    snapshots = {}
    while plain.has_unfinished():
        plain.step()
        for t in plain.scheduler.running:
            snapshots[t.request_id, t.cached] = (list(t.out.tokens), [(plain.cache[i].k[t.row].clone(),
                                                                        plain.cache[i].v[t.row].clone())
                                                                       for i in range(model.args.n_layers)])
    trace = Trace()
    spec = Engine(model, None, max_rows=2, chunk_size=4, max_seq_len=96, trace=trace,
                  speculation=Speculation(drafter, draft_tokens=3, cost_curve=FLAT))
    for p in prompts:
        spec.add_request(p, params)
    W, S, Sp = 6, spec.cache.size_for(6), plain.cache.size_for(6)
    assert (S, Sp) == (9, 9 if spare else 6)
    checked = rolled = 0
    while spec.has_unfinished():
        spec.step()
        for s in spec.scheduler.running:
            tokens, rows = snapshots[s.request_id, s.cached]
            assert tokens == s.out.tokens
            held = trace.steps[-1].slots[W][s.row]
            for pos in range(max(0, s.cached - W), s.cached):
                assert held[pos % S] == pos
                for layer, (k, v) in enumerate(rows):
                    assert torch.equal(spec.cache[layer].k[s.row, :, pos % S], k[:, pos % Sp])
                    assert torch.equal(spec.cache[layer].v[s.row, :, pos % S], v[:, pos % Sp])
                checked += 1
            stale = [p for p in held if p is not None and p >= s.cached]
            rolled += len(stale)
            assert all(p < s.cached + 3 for p in stale)                  # only this row's last drafts
    assert checked > 100 and rolled > 0 and spec.stats.accepted_tokens < spec.stats.proposed_tokens


# -- stop strings, EOS, and a stateful processor -------------------------------------------------------------
class Spell(LogitsProcessor):
    """A stateful constraint that spells ``text``: its i-th kept token must be the i-th character's (row j of a
    draft's mask: the character after the draft's first j tokens)."""

    def __init__(self, text, tokenizer, vocab):
        self.ids, self.vocab, self.kept = tokenizer.encode(text, bos=False), vocab, 0

    def fill_mask(self, out, draft):
        out.zero_()
        for j in range(len(draft) + 1):
            t = self.ids[(self.kept + j) % len(self.ids)]
            out[j, t // 32] = (1 << (t % 32)) if t % 32 < 31 else -2**31
        return True

    def accept(self, tokens):
        self.kept += len(tokens)


def test_stop_strings_and_eos_inside_accepted_drafts():
    """Drafts accepted past a stop string or EOS are dropped: the same tokens, text and stream as plain decoding."""
    model = model_for("mistral")
    tok = ByteTokenizer()
    text = "the quick brown fox jumps over the lazy dog"

    class Spelled:
        def processor(self, tokenizer, vocab_size):
            return Spell(text, tokenizer, vocab_size)

    drafter = KnownDrafter({tuple(tok.encode("The")): tok.encode(text, bos=False)}, 259, p=1.0)
    for params in [SamplingParams(max_tokens=40, stop=("lazy",), stop_on_eos=False, constraint=Spelled()),
                   SamplingParams(max_tokens=40, constraint=Spelled())]:
        if not params.stop:
            tok.eos_id = tok.encode("x", bos=False)[0]           # the x of fox, the 19th token
        plain = list(Engine(model, tok, max_seq_len=96).stream(["The"], params))
        engine = Engine(model, tok, max_seq_len=96, speculation=Speculation(drafter, draft_tokens=5, cost_curve=FLAT))
        events = list(engine.stream(["The"], params))
        c, want = events[-1].completion, plain[-1].completion
        assert c.finish_reason == want.finish_reason == "stop"
        assert c.text == ("the quick brown fox jumps over the " if params.stop else "the quick brown fo")   # EOS: x
        assert (c.tokens, c.logprobs, c.text) == (want.tokens, want.logprobs, want.text)
        assert [e.text for e in events] == [e.text for e in plain]       # the same stream, piece by piece
        st = engine.stats
        assert st.accepted_tokens == st.proposed_tokens > len(c.tokens) // 2
        assert st.decode_steps < len(c.tokens) // 2


class Cycle(LogitsProcessor):
    """A stateful constraint: the i-th token kept must be congruent to i modulo 3. ``fill_mask`` computes each
    draft position's state as if the draft before it were kept; only ``accept`` advances."""

    def __init__(self, vocab):
        self.vocab, self.kept, self.drafts = vocab, [], []

    def fill_mask(self, out, draft):
        self.drafts.append(list(draft))
        out.zero_()
        for j in range(len(draft) + 1):
            state = (len(self.kept) + j) % 3
            for t in range(state, self.vocab, 3):
                out[j, t // 32] |= 1 << (t % 32) if t % 32 < 31 else -2**31
        return True

    def accept(self, tokens):
        self.kept += tokens


class CycleConstraint:
    def __init__(self):
        self.made = []

    def processor(self, tokenizer, vocab_size):
        self.made.append(Cycle(vocab_size))
        return self.made[-1]


def test_a_stateful_processor_sees_the_drafts_and_only_the_kept_tokens():
    model = model_for("mistral")
    prompt = prompts_for(5)[0]
    plain_c, spec_c = CycleConstraint(), CycleConstraint()
    [plain], _ = run(model, [prompt], SamplingParams(max_tokens=20, stop_on_eos=False, constraint=plain_c))
    assert [t % 3 for t in plain.tokens] == [i % 3 for i in range(20)]
    drafter = KnownDrafter({tuple(prompt): plain.tokens}, 259, p=0.6, seed=1)
    [spec], engine = run(model, [prompt], SamplingParams(max_tokens=20, stop_on_eos=False, constraint=spec_c),
                         Speculation(drafter, draft_tokens=3, cost_curve=FLAT))
    assert_identical([spec], [plain])
    processor = spec_c.made[0]
    assert processor.kept == spec.tokens                         # told the kept tokens only, in order
    assert any(processor.drafts) and 0 < engine.stats.accepted_tokens < engine.stats.proposed_tokens


# -- what speculation refuses ----------------------------------------------------------------------------------
def test_speculation_needs_row_exact_kernels_and_an_executor_that_shares_its_step_times():
    model = model_for("mistral")
    with pytest.raises(SiroccoError, match="needs the model on the cpu backend.* and here layers.0.attention: no "):
        Engine(build_model(ARGS["mistral"], seed=21), None, speculation=Speculation(cost_curve=FLAT))   # reference

    class Remote:
        def __init__(self, m):
            self.model = m

    with pytest.raises(SiroccoError, match="an executor that can share the step times"):
        Engine(model, None, executor=Remote(model), speculation=Speculation(cost_curve=FLAT))
    with pytest.raises(ValueError, match=r"draft_tokens must be in \[1, 7\]"):
        Speculation(draft_tokens=8)
    with pytest.raises(ValueError, match="cost_curve must give 8 positive"):
        Speculation(cost_curve=[1.0, 2.0])
    other = build_model(preset("tiny", vocab_size=300), seed=1)
    with pytest.raises(ValueError, match="vocabulary has 300 tokens and the target's 259"):
        Engine(model, None, speculation=Speculation(other, cost_curve=FLAT))


def test_a_request_may_turn_drafting_off():
    model = model_for("mistral")
    prompts = prompts_for(6)[:2]
    params = [SamplingParams(max_tokens=12, stop_on_eos=False, draft_tokens=0),
              SamplingParams(max_tokens=12, stop_on_eos=False)]
    drafter = known_drafter(model, prompts, params, p=1.0)
    spec, _ = run(model, prompts, params, Speculation(drafter, draft_tokens=3, cost_curve=FLAT))
    assert spec[0].proposed_tokens is None and "proposed_tokens" not in spec[0].to_json()
    assert spec[1].proposed_tokens > 0 and spec[1].to_json()["accepted_tokens"] == spec[1].accepted_tokens
    with pytest.raises(ValueError, match="draft_tokens must be >= 0"):
        SamplingParams(draft_tokens=-1)


# -- the drafters ----------------------------------------------------------------------------------------------
def test_ngram_index_prefers_the_longest_then_the_most_recent_match():
    index = NgramIndex(3)
    index.extend([5, 6, 7, 1, 5, 6, 8, 2, 6, 9, 4, 5, 6])
    # suffix (5, 6): 3-gram (4, 5, 6) unseen; 2-gram (5, 6) last seen followed by 8 (not the older 7)
    assert index.propose(3) == [8, 2, 6]
    assert index.propose(3, min_n=3) == []
    index.extend([9])                          # suffix (6, 9) seen before, followed by 4
    assert index.propose(2) == [4, 5]
    one = NgramIndex(3)
    for t in index.tokens:                     # built token by token: the same index
        one.extend([t])
    assert one.after == index.after


def test_ngram_drafter_follows_each_sequence_and_reads_on_through_repetition():
    drafter = NgramDrafter(n=2)
    params = SamplingParams()
    [a, b] = drafter.propose([DraftRequest("a", 0, [1, 2, 3, 1, 2], [], 4, params),
                              DraftRequest("b", 1, [7, 8], [], 4, params)])
    assert a.tokens == [3, 1, 2, 3] and a.probs is None and b.tokens == []
    [a] = drafter.propose([DraftRequest("a", 0, [1, 2, 3, 1, 2], [3, 9], 2, params)])
    assert a.tokens == []                       # (3, 9) and (9,) never seen
    with pytest.raises(ValueError, match="only grows"):
        drafter.propose([DraftRequest("a", 0, [1, 2], [], 2, params)])
    drafter.release("a")
    assert drafter.propose([DraftRequest("a", 0, [1, 2], [], 2, params)])[0].tokens == []


# -- the rule: how many drafts a step takes ----------------------------------------------------------------------
class FakeSeq:
    def __init__(self, i, acceptance, cached=20):
        self.row, self.cached, self.request_id = i, cached, f"r{i}"
        self.params = SamplingParams(max_tokens=100)
        self.spec = RowSpeculation(k=7, limit=7, hits=acceptance * 1000, trials=1000)
        self.prompt_left = 0

        class Out:
            prompt_tokens = [1] * 10
            tokens = [2] * 10
        self.out = Out()


class Lookup:
    costly = False

    def propose(self, requests):
        return [Draft([5] * r.k) for r in requests]

    def release(self, key):
        pass

    def move_row(self, src, dst):
        pass


def chosen(curve, acceptances, lengths=None, sampling=None):
    seqs = [FakeSeq(i, a) for i, a in enumerate(acceptances)]
    lengths = lengths or [1] * len(seqs)
    spec = Speculator(Speculation(Lookup(), draft_tokens=7), Lookup(), curve)
    drafts = spec.drafts(seqs, lengths, 1000, len(seqs) if sampling is None else sampling)
    return [len(drafts[i].tokens) if i in drafts else 0 for i in range(len(seqs))]


def test_drafts_go_where_they_are_expected_to_pay():
    flat = [1.0] * 8
    assert chosen(flat, [0.9]) == [7]                          # free extra rows: draft as far as the step allows
    assert chosen(flat, [0.9, 0.6]) == [5, 1]                  # by expected gain: 0.9 ** 4 > 0.6 > 0.9 ** 5
    compute_bound = [float(t) for t in range(1, 9)]            # a row costs a step: only certainty would pay
    assert chosen(compute_bound, [0.95, 0.95]) == [0, 0]
    memory_bound = [1.0, 1.02, 1.04, 1.06, 1.1, 1.2, 1.5, 2.0]
    assert chosen(memory_bound, [0.01]) == [0]                 # rarely right: not worth even a cheap row
    assert 0 < sum(chosen(memory_bound, [0.8])) < 7
    assert chosen(flat, [0.9] * 8) == [0] * 8                  # eight decode rows: no room left
    assert chosen(flat, [0.9, 0.9], lengths=[1, 6], sampling=1) == [1, 0]   # beside a pre-fill chunk: what fits


def test_each_row_adapts_its_draft_length_to_its_acceptance():
    st = RowSpeculation(k=2, limit=5)
    spec = Speculator(Speculation(Lookup(), draft_tokens=5), Lookup(), [1.0] * 8)
    seq = type("S", (), {"spec": st})()
    a0 = st.acceptance
    spec.settle(seq, Draft([1, 2]), [1, 2, 3])                 # all accepted: k grows
    assert st.k == 3 and st.acceptance > a0 and (st.proposed, st.accepted) == (2, 2)
    spec.settle(seq, Draft([1, 2, 3]), [1, 2, 3, 4])
    spec.settle(seq, Draft([1, 2, 3, 4]), [1, 2, 3, 4, 5])
    spec.settle(seq, Draft([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5, 6])
    assert st.k == 5                                            # at most the limit
    high, hits, trials = st.acceptance, st.hits, st.trials
    spec.settle(seq, Draft([1, 2, 3, 4, 5]), [9])               # the first draft rejected: k falls to one
    assert st.k == 1 and st.acceptance < high
    assert math.isclose(st.trials, 0.8 * trials + 1) and math.isclose(st.hits, 0.8 * hits)   # one trial, no hit


def test_the_cost_curve_is_the_lower_envelope_of_the_best_readings():
    from sirocco.generate.speculation import measure_steps

    readings = [9, 9, 9,                 # the untimed round
                1.0, 1.2, 5.0,           # a busy moment on the third count's first reading
                1.1, 1.3, 1.4,
                1.2, 9.0, 1.5]           # ... and on the second count's last
    clock = iter([t for r in readings for t in (0.0, r)])
    assert measure_steps(lambda n: None, counts=3, repeats=3, clock=lambda: next(clock)) == [1.0, 1.2, 1.4]
    clock = iter([t for r in [9, 9, 9, 2.0, 1.5, 3.0] for t in (0.0, r)])    # a reading below a smaller count's
    assert measure_steps(lambda n: None, counts=3, repeats=1, clock=lambda: next(clock)) == [1.5, 1.5, 3.0]


# -- over pipeline ranks -------------------------------------------------------------------------------------------
def _pipeline_rank(ctx, continuations):
    from sirocco.distributed.executor import PipelineExecutor
    from sirocco.distributed.stages import rank_stage

    stage = rank_stage(ctx, ARGS["mistral"], seed=21, backend="cpu")
    out = []
    for speculation in (None, Speculation(KnownDrafter(continuations, 259, p=0.6, seed=2), draft_tokens=3)):
        engine = Engine(stage, None, executor=PipelineExecutor(stage, ctx), max_rows=4, chunk_size=4, max_seq_len=96,
                        speculation=speculation)
        done = engine.generate(prompts_for(), GREEDY)
        out.append({"done": [(c.tokens, c.logprobs) for c in done], "proposed": engine.stats.proposed_tokens,
                    "accepted": engine.stats.accepted_tokens,
                    "cost": None if speculation is None else engine.speculator.cost})
    return out


@pytest.mark.slow
def test_over_pipeline_ranks_speculation_keeps_the_output_and_every_rank_decides_alike():
    """Two gloo ranks: each measures the step times, the first rank's are kept by both (so both choose the same
    drafts), and the greedy output is plain pipelined decoding's, bit for bit, and one process's tokens."""
    from sirocco.distributed.launch import spawn_local

    model = model_for("mistral")
    prompts = prompts_for()
    plain, _ = run(model, prompts, GREEDY)
    continuations = {tuple(p): c.tokens for p, c in zip(prompts, plain)}
    results = spawn_local(_pipeline_rank, 2, (continuations,), timeout_s=120, deadline_s=300)
    assert all(r.ok for r in results), [r.error for r in results]
    (plain0, spec0), (plain1, spec1) = [r.value for r in results]
    assert spec0["cost"] == spec1["cost"] and spec0["proposed"] == spec1["proposed"] > 0
    assert 0 < spec0["accepted"] < spec0["proposed"]
    assert spec0["done"] == plain0["done"] == spec1["done"]
    assert [t for t, _ in spec0["done"]] == [c.tokens for c in plain]


def test_structured_outputs_keep_their_answers_under_speculation():
    """A JSON schema's grammar (llguidance's matcher, generate/grammar.py) masks each draft position as if the draft
    before it were kept, and rolls back what was not: greedy and seeded sampled answers are plain decoding's and
    valid."""
    import json

    from sirocco.generate.grammar import json_schema_grammar
    from sirocco.pretrained import load

    loaded = load("sirocco-tiny", backend="cpu")
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 3, "maxItems": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["items", "n"]}
    grammar = json_schema_grammar(schema, strict=True)
    params = [SamplingParams(max_tokens=200, constraint=grammar),
              SamplingParams(max_tokens=200, temperature=1.0, seed=3, constraint=grammar)]
    prompts = ["A list of", "Return a new dictionary"]
    plain = Engine(loaded.model, loaded.tokenizer, max_rows=2).generate(prompts, params)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=2,
                    speculation=Speculation("ngram", draft_tokens=4, cost_curve=FLAT))
    spec = engine.generate(prompts, params)
    assert_identical(spec, plain)
    for c in spec:
        assert c.finish_reason == "stop" and set(json.loads(c.text)) == {"items", "n"}
    assert engine.stats.accepted_tokens > 0


def test_an_observed_request_sees_its_drafts_and_how_many_it_kept():
    """What the chat page's step timeline shows: per verify step, the draft tokens the row verified, and from its
    cached count after the rollback how many it kept; over the run they add up to the engine's counts."""
    from sirocco.viz.inside import RowTrace

    model = model_for("mistral")
    prompt = prompts_for()[0]
    seen = []

    class Keep:
        def on_row_step(self, step):
            seen.append(step)

    engine = Engine(model, None, max_rows=2, chunk_size=4, max_seq_len=96,
                    speculation=Speculation(known_drafter(model, [prompt], GREEDY, p=0.6), draft_tokens=3,
                                            cost_curve=FLAT))
    engine.add_request(prompt, GREEDY, observer=Keep())
    while engine.has_unfinished():
        engine.step()
    verified = [s for s in seen if s.drafted]
    assert verified and all(len(s.tokens) == s.drafted + 1 for s in verified)
    kept = [s.cached - s.start - 1 for s in verified]
    assert all(0 <= k <= s.drafted for k, s in zip(kept, verified)) and 0 < sum(kept) < sum(s.drafted for s in verified)
    assert (sum(s.drafted for s in verified), sum(kept)) == (engine.stats.proposed_tokens, engine.stats.accepted_tokens)
    event = RowTrace().event(seen)                                   # the page's event over the whole run
    assert [(e["proposed_tokens"], e["accepted_tokens"]) for e in event["steps"] if "proposed_tokens" in e] == \
        [(s.drafted, k) for s, k in zip(verified, kept)]
