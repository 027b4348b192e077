"""The engine against full recomputation, batching invariance, stopping, streaming."""

import pytest
import torch

from sirocco.config import preset
from sirocco.generate.engine import Engine, PromptTooLong
from sirocco.generate.sampling import RowSampling, SamplingParams, filter_logits, make_generator, sample
from sirocco.generate.text import TextTracker
from sirocco.model import build_model

from fakes import ByteTokenizer

ARGS = {"mistral": preset("tiny", vocab_size=259, sliding_window=6),
        "mixtral": preset("tiny-moe", vocab_size=259)}


def model_for(name, seed=21):
    return build_model(ARGS[name], seed=seed)


def recompute(model, prompt, params, n):
    """Generate n tokens by re-running the whole sequence without a cache at every step."""
    seq, tokens, logprobs = list(prompt), [], []
    gen = make_generator(params.seed, torch.device("cpu")) if params.temperature > 0 else None
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor(seq), [len(seq)])[-1:]
            (got,) = sample(logits, [RowSampling(params, gen)])
            tokens += got.tokens
            logprobs += got.logprobs
            seq += got.tokens
    return tokens, logprobs


@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=20),
                                    SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=5)],
                         ids=["greedy", "sampled"])
def test_engine_equals_full_recomputation(name, params):
    model = model_for(name)
    prompt = torch.randint(3, 259, (9,)).tolist()
    engine = Engine(model, None, max_rows=2, chunk_size=4, max_seq_len=64)
    [c] = engine.generate([prompt], params)
    tokens, logprobs = recompute(model, prompt, params, 20)
    assert c.tokens == tokens and c.finish_reason == "length"
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARGS)
def test_prompts_together_equal_prompts_alone(name):
    model = model_for(name)
    prompts = [torch.randint(3, 259, (n,)).tolist() for n in (3, 17, 8, 1, 12)]
    params = [SamplingParams(max_tokens=m, temperature=t, seed=i) for i, (m, t) in
              enumerate([(12, 0), (5, 0.8), (15, 0), (9, 1.2), (1, 0)])]
    engine = Engine(model, None, max_rows=3, chunk_size=5, max_seq_len=64)   # fewer rows than prompts
    together = engine.generate(prompts, params)
    for p, sp, c in zip(prompts, params, together, strict=True):
        [alone] = Engine(model, None, max_rows=1, chunk_size=64, max_seq_len=64).generate([p], sp)
        assert c.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_eos_stops_one_sequence_and_frees_its_row():
    model = model_for("mistral")
    tok = ByteTokenizer()
    prompts = ["abc", "hello world", "xyz"]
    free_run = Engine(model, None, max_rows=3).generate([tok.encode(p) for p in prompts],
                                                       SamplingParams(max_tokens=12))
    eos = free_run[1].tokens[3]               # make sequence 1 stop at its 4th token
    tok.eos_id = eos
    engine = Engine(model, tok, max_rows=3, max_seq_len=64)
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    first = free_run[1].tokens.index(eos)
    assert out[1].tokens == free_run[1].tokens[:first + 1] and out[1].finish_reason == "stop"
    for i in (0, 2):       # the others continue exactly as before unless they hit the same id
        k = free_run[i].tokens.index(eos) + 1 if eos in free_run[i].tokens else 12
        assert out[i].tokens == free_run[i].tokens[:k]


def test_stop_string_and_stream_agree():
    model = model_for("mistral")
    tok = ByteTokenizer()
    [free] = Engine(model, tok).generate(["The"], SamplingParams(max_tokens=30, stop_on_eos=False))
    stop = free.text[5:7]
    engine = Engine(model, tok)
    events = list(engine.stream(["The"], SamplingParams(max_tokens=30, stop=(stop,), stop_on_eos=False)))
    c = events[-1].completion
    assert c.finish_reason == "stop" and c.text == free.text[:free.text.index(stop)]
    assert "".join(e.text for e in events) == c.text
    assert len(c.tokens) == len(c.logprobs) < 30


def test_text_tracker_waits_for_whole_characters():
    tok = ByteTokenizer()
    tracker = TextTracker(tok, tok.encode("x"))
    pieces = [tracker.push(t)[0] for t in tok.encode("café 日本", bos=False)]
    assert "".join(pieces) + tracker.finish() == "café 日本"
    assert "\ufffd" not in "".join(pieces)


def test_prompt_too_long_says_the_limit():
    engine = Engine(model_for("mistral"), None, max_seq_len=32)
    with pytest.raises(PromptTooLong, match="limit is 31"):
        engine.generate([list(range(3, 40))])


def test_length_limit_of_the_cache_ends_generation():
    engine = Engine(model_for("mixtral"), None, max_seq_len=20)
    [c] = engine.generate([list(range(3, 18))], SamplingParams(max_tokens=50))
    assert c.finish_reason == "length" and len(c.prompt_tokens) + len(c.tokens) == 20


def test_top_p_and_top_k_filtering():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda f: torch.isfinite(f).tolist()
    assert kept(filter_logits(logits, 1.0, 0, 0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]
    assert kept(filter_logits(logits, 1.0, 3, 1.0)) == [True, True, True, False]


def test_logprobs_are_of_the_unmodified_distribution():
    logits = torch.randn(2, 10)
    params = [SamplingParams(temperature=0.3, top_k=2, seed=1), SamplingParams()]
    got = sample(logits, [RowSampling(params[0], make_generator(1, torch.device("cpu"))), RowSampling(params[1])])
    toks = [g.tokens[0] for g in got]
    lps = torch.tensor([g.logprobs[0] for g in got])
    torch.testing.assert_close(lps, torch.log_softmax(logits, -1)[[0, 1], toks])
