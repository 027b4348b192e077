"""Sharded generation over 2 (and 3) gloo ranks on the CPU against one process, and failing together.

Each test spawns its ranks once (``spawn_local``: a free port per launch, one thread per rank) and checks what
they return against the single-process engine and a full recomputation without cache.
"""

import contextlib
import io
import json
import time
from itertools import pairwise

import pytest
import torch

from sirocco.config import preset
from sirocco.distributed.executor import PipelineExecutor, split_groups
from sirocco.distributed.launch import DistributedError, spawn_local
from sirocco.distributed.stages import parameter_bytes, rank_stage, split_layers
from sirocco.errors import ConfigError
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model

from fakes import ByteTokenizer

# Windows (6) shorter than the sequences, so caches roll; Mixtral without a window, with experts.
ARGS = {"mistral": preset("tiny", vocab_size=259, sliding_window=6),
        "mixtral": preset("tiny-moe", vocab_size=259)}
SEED = 21
ENGINE = dict(max_rows=3, chunk_size=5, max_seq_len=64)      # fewer rows than prompts; chunked pre-fill
LENGTHS = (3, 17, 8, 1, 12)                                   # packed prompts of different lengths
GREEDY = [SamplingParams(max_tokens=m) for m in (12, 5, 15, 9, 1)]
SAMPLED = [SamplingParams(max_tokens=m, temperature=t, top_p=p, top_k=k, seed=100 + i)
           for i, (m, t, p, k) in enumerate([(12, 0.9, 0.9, 0), (5, 1.2, 1.0, 40), (15, 0.7, 0.95, 0),
                                             (9, 1.0, 1.0, 0), (3, 0.8, 0.8, 20)])]


pytestmark = pytest.mark.slow          # every test spawns gloo ranks


def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in LENGTHS]


def run_rank(ctx, args, runs):
    """One rank: its stage, then each (micro_batches, params) run; returns completions and memory facts."""
    stage = rank_stage(ctx, args, seed=SEED)
    out = {"names": sorted(stage.state_dict()), "param_bytes": parameter_bytes(stage), "runs": []}
    for micro_batches, params in runs:
        # min_group_tokens=1: split even these tiny steps, so that every step exercises the micro-batches.
        executor = PipelineExecutor(stage, ctx, micro_batches=micro_batches, min_group_tokens=1)
        engine = Engine(stage, None, executor=executor, **ENGINE)
        done = engine.generate(prompts(), params)
        out["runs"].append([(c.tokens, c.logprobs, c.finish_reason) for c in done])
        out["cache_bytes"] = engine.cache.nbytes()
    return out


def single_process(name, params):
    model = build_model(ARGS[name], seed=SEED)
    return Engine(model, None, **ENGINE).generate(prompts(), params), model


def recompute_greedy(model, prompt, n):
    """Greedy tokens by re-running the whole sequence without a cache at every step (no engine involved)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor(seq), [len(seq)])[-1].argmax()))
    return seq[len(prompt):]


def assert_ok(results):
    for r in results:
        assert r.ok, f"rank {r.rank} failed: {r.error}"


@pytest.fixture(scope="module")
def sharded():
    """Both models over 2 ranks: greedy and sampled, with and without micro-batches (one launch per model)."""
    runs = [(2, GREEDY), (1, GREEDY), (2, SAMPLED), (1, SAMPLED)]
    out = {}
    for name in ARGS:
        results = spawn_local(run_rank, 2, (ARGS[name], runs), timeout_s=60, deadline_s=90)
        assert_ok(results)
        out[name] = [r.value for r in results]
    return out


@pytest.mark.parametrize("name", ARGS)
def test_sharded_greedy_equals_single_process(sharded, name):
    reference, model = single_process(name, GREEDY)
    for p, sp, c in zip(prompts(), GREEDY, reference, strict=True):            # the reference itself, engine-free
        assert c.tokens == recompute_greedy(model, p, sp.max_tokens)
    for rank in sharded[name]:
        for run in rank["runs"][:2]:                               # with and without micro-batches
            assert [t for t, _, _ in run] == [c.tokens for c in reference]
            assert [f for _, _, f in run] == [c.finish_reason for c in reference]
            for (_, lp, _), c in zip(run, reference, strict=True):
                torch.testing.assert_close(torch.tensor(lp), torch.tensor(c.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARGS)
def test_sharded_sampling_is_the_same_on_every_rank_and_equals_single_process(sharded, name):
    reference, _ = single_process(name, SAMPLED)
    rank0, rank1 = sharded[name]
    assert rank0["runs"][2:] == rank1["runs"][2:]                  # every rank: same tokens and logprobs
    for run in rank0["runs"][2:]:
        assert [t for t, _, _ in run] == [c.tokens for c in reference]
        for (_, lp, _), c in zip(run, reference, strict=True):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(c.logprobs), atol=1e-5, rtol=0)
    # The sampled tokens are really sampled: they differ from greedy decoding.
    assert [t for t, _, _ in rank0["runs"][2]] != [t for t, _, _ in rank0["runs"][0]]


@pytest.mark.parametrize("name", ARGS)
def test_each_rank_holds_about_half_the_model(sharded, name):
    full = build_model(ARGS[name], seed=SEED)
    full_bytes = parameter_bytes(full)
    rank0, rank1 = sharded[name]
    assert set(rank0["names"]).isdisjoint(rank1["names"])
    assert set(rank0["names"]) | set(rank1["names"]) == set(full.state_dict())
    assert "tok_embeddings.weight" in rank0["names"] and "output.weight" in rank1["names"]
    assert rank0["param_bytes"] + rank1["param_bytes"] == full_bytes
    for r in (rank0, rank1):
        assert 0.4 < r["param_bytes"] / full_bytes < 0.6
    cache_bytes = Engine(full, None, **ENGINE).cache.nbytes()
    assert rank0["cache_bytes"] == rank1["cache_bytes"] == cache_bytes // 2   # one layer of two each


def test_three_ranks_with_a_middle_stage():
    args = preset("tiny", vocab_size=259, sliding_window=6, n_layers=3)
    results = spawn_local(run_rank, 3, (args, [(3, GREEDY)]), timeout_s=60, deadline_s=90)
    assert_ok(results)
    reference = Engine(build_model(args, seed=SEED), None, **ENGINE).generate(prompts(), GREEDY)
    for r in results:
        assert [t for t, _, _ in r.value["runs"][0]] == [c.tokens for c in reference]


# -- failures -------------------------------------------------------------------------------------------------
def failing_rank(ctx, bad_rank, after_calls):
    """Generate; rank ``bad_rank`` raises in its stage's forward after ``after_calls`` calls."""
    stage = rank_stage(ctx, ARGS["mistral"], seed=SEED)
    if ctx.rank == bad_rank:
        calls = []

        def explode(module, inputs):
            calls.append(1)
            if len(calls) > after_calls:
                raise RuntimeError("injected failure")
        stage.register_forward_pre_hook(explode)
    Engine(stage, None, executor=PipelineExecutor(stage, ctx), **ENGINE).generate(prompts(), GREEDY)
    return "finished"


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_a_failing_rank_makes_the_others_fail_within_seconds(bad_rank):
    t0 = time.time()
    results = spawn_local(failing_rank, 2, (bad_rank, 3), timeout_s=120, deadline_s=60, grace_s=30)
    bad, good = results[bad_rank], results[1 - bad_rank]
    assert bad.error_type == "RuntimeError" and "injected failure" in bad.error
    assert good.error_type == "DistributedError", good.error       # an error, not a hang nor a success
    assert "lost the other ranks" in good.error
    assert good.finished_at - bad.finished_at < 5.0                # seconds, far below the 120 s timeout
    assert time.time() - t0 < 30


def hanging_rank(ctx):
    """Rank 1 stops answering in the middle of generation (a stuck device, a deadlock)."""
    stage = rank_stage(ctx, ARGS["mistral"], seed=SEED)
    if ctx.rank == 1:
        stage.register_forward_pre_hook(lambda module, inputs: time.sleep(60))
    Engine(stage, None, executor=PipelineExecutor(stage, ctx), **ENGINE).generate(prompts(), GREEDY)
    return "finished"


def test_a_silent_rank_makes_the_others_fail_at_the_timeout():
    results = spawn_local(hanging_rank, 2, timeout_s=3, deadline_s=60, grace_s=1)
    waiting, silent = results
    assert waiting.error_type == "DistributedError", waiting.error
    assert "lost the other ranks" in waiting.error and "timed out after 3 s" in waiting.error
    assert waiting.seconds < 20
    assert silent.error_type == "hang"                             # still asleep: spawn_local ended it


def mismatched_rank(ctx):
    args = ARGS["mistral"] if ctx.rank == 0 else ARGS["mistral"].replace(rope_theta=1e6)
    rank_stage(ctx, args, seed=SEED)
    return "loaded"


def test_ranks_with_different_models_fail_with_the_same_clear_message():
    results = spawn_local(mismatched_rank, 2, timeout_s=60, deadline_s=60)
    for r in results:
        assert r.error_type == "DistributedError", r.error
        assert "ranks disagree on the model to load" in r.error and "ranks [0]" in r.error and "ranks [1]" in r.error


def one_layer_model(ctx):
    rank_stage(ctx, preset("tiny", n_layers=1), seed=SEED)
    return "loaded"


def test_more_ranks_than_layers_fails_on_every_rank():
    results = spawn_local(one_layer_model, 2, timeout_s=60, deadline_s=60)
    for r in results:
        assert r.error_type == "ConfigError", r.error
        assert "cannot split 1 layers into 2 pipeline stages" in r.error


# -- the command line ----------------------------------------------------------------------------------------------
def parse_generate(argv):
    """The ``sirocco generate`` options, as the real command line parses them."""
    from sirocco.cli import build_parser
    return build_parser().parse_args(["generate", *argv])


def printed(fn, *args):
    """(what ``fn(*args)`` returns, what it printed to standard output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        value = fn(*args)
    return value, out.getvalue()


def cli_rank(ctx, argv, random_stage=True):
    """``sirocco generate --pipeline-ranks 2 ...`` on this rank; returns (exit code, standard output). With
    ``random_stage`` the random Mistral stage and a byte tokenizer stand in for a checkpoint folder; without,
    the command loads what ``--model`` names, as it does for users."""
    from sirocco.cli import generate
    if random_stage:
        generate.load_rank_stage = lambda model, ctx, dtype, quantize=None, **conversion: (
            rank_stage(ctx, ARGS["mistral"], seed=SEED, dtype=dtype, quantize=quantize, **conversion),
            ByteTokenizer(), "random")
    return printed(generate.run, parse_generate(argv))


def test_generate_command_over_two_ranks_prints_once_what_one_process_generates():
    texts = ["The sliding window", "A rolling buffer cache keeps", "é"]
    argv = ["--pipeline-ranks", "2", "--json", "--max-tokens", "9", "--seed", "4", "--chunk-size", "5",
            "--micro-batches", "2", *texts]
    results = spawn_local(cli_rank, 2, (argv,), timeout_s=60, deadline_s=60)
    assert_ok(results)
    (code0, out0), (code1, out1) = [r.value for r in results]
    assert code0 == code1 == 0 and out1 == ""                    # rank 0 alone prints
    lines = [json.loads(line) for line in out0.splitlines()]
    args = parse_generate(argv)
    longest = max(len(ByteTokenizer().encode(t)) for t in texts)
    engine = Engine(build_model(ARGS["mistral"], seed=SEED), ByteTokenizer(), max_rows=args.max_rows, chunk_size=5,
                    max_seq_len=longest + 9)                       # the generate verb sizes its cache so
    params = [SamplingParams(max_tokens=9, temperature=args.temperature, top_p=args.top_p, seed=4 + i)
              for i in range(len(texts))]
    reference = engine.generate(texts, params)
    assert [d["prompt"] for d in lines] == texts
    assert [d["tokens"] for d in lines] == [c.tokens for c in reference]
    assert [d["text"] for d in lines] == [c.text for c in reference]


def test_generate_command_with_the_wrong_number_of_ranks_fails_on_every_rank():
    results = spawn_local(cli_rank, 2, (["--pipeline-ranks", "3", "hello"],), timeout_s=60, deadline_s=60)
    assert results[0].error_type == "DistributedError" and "--pipeline-ranks 3 but torchrun started 2" in \
        results[0].error
    assert results[1].ok and results[1].value == (1, "")          # the others exit with an error code, quietly


# -- pieces -----------------------------------------------------------------------------------------------------
def test_split_layers_is_contiguous_and_balanced():
    assert split_layers(32, 3) == [list(range(0, 11)), list(range(11, 22)), list(range(22, 32))]
    assert split_layers(2, 2) == [[0], [1]]
    with pytest.raises(ConfigError, match="cannot split 2 layers into 3"):
        split_layers(2, 3)


def test_split_groups_covers_every_sequence_once_in_order():
    for lengths in ([1] * 7, [5, 1, 1, 9, 2], [3], [1, 40]):
        for n in (1, 2, 3, 4):
            groups = split_groups(lengths, n)
            assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
            assert all(a < b for a, b in groups) and all(g[1] == h[0] for g, h in pairwise(groups))
            assert len(groups) == min(n, len(lengths))


def test_without_a_distributed_launch_the_error_says_how_to_start(monkeypatch):
    from sirocco.distributed.launch import init_distributed
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistributedError, match="torchrun --nproc-per-node"):
        init_distributed()


def run_rank_from_folder(ctx, folder):
    """One rank of a pipeline loading its stage from a checkpoint folder (only its own tensors)."""
    stage = rank_stage(ctx, folder)
    engine = Engine(stage, None, executor=PipelineExecutor(stage, ctx, micro_batches=2, min_group_tokens=1), **ENGINE)
    done = engine.generate(prompts(), GREEDY)
    return {"names": sorted(stage.state_dict()), "tokens": [c.tokens for c in done]}


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_sharded_from_a_hugging_face_checkpoint_folder(kind, tmp_path):
    from sirocco.checkpoint import load_model

    from hf_fixtures import save_hf_checkpoint
    save_hf_checkpoint(kind, tmp_path, window=6, seed=3, vocab_size=259)
    results = spawn_local(run_rank_from_folder, 2, (str(tmp_path),), timeout_s=60, deadline_s=90)
    assert_ok(results)
    model = load_model(tmp_path)
    reference = Engine(model, None, **ENGINE).generate(prompts(), GREEDY)
    rank0, rank1 = (r.value for r in results)
    assert rank0["tokens"] == rank1["tokens"] == [c.tokens for c in reference]
    assert rank0["names"] == sorted(k for k in model.state_dict() if k.startswith(("tok_", "layers.0.")))
    assert rank1["names"] == sorted(k for k in model.state_dict() if k.startswith(("norm", "output", "layers.1.")))


def test_generate_command_over_two_ranks_loads_the_bundled_default_model():
    from sirocco.cli import main
    argv = ["--json", "--max-tokens", "12", "--chunk-size", "16", "The with statement", "Return a new"]
    results = spawn_local(cli_rank, 2, (["--pipeline-ranks", "2", *argv], False), timeout_s=60, deadline_s=90)
    assert_ok(results)
    (code0, out0), (code1, out1) = [r.value for r in results]
    assert code0 == code1 == 0 and out1 == ""
    code, out = printed(main, ["generate", *argv])
    assert code == 0
    sharded = [json.loads(line) for line in out0.splitlines()]
    single = [json.loads(line) for line in out.splitlines()]
    assert [d["tokens"] for d in sharded] == [d["tokens"] for d in single]
    assert all(len(d["tokens"]) == 12 for d in single)


def test_a_json_schema_over_two_ranks_ends_rows_alike_and_equals_one_process(tmp_path):
    """Every rank builds each row's matcher and decides alike when its grammar is complete; only the last samples."""
    from sirocco.cli import main
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"w": {"type": "string", "maxLength": 6},
                                                                   "n": {"enum": [1, 2, 3]}}, "required": ["w", "n"]}))
    argv = ["--json", "--max-tokens", "60", "--temperature", "1", "--json-schema", str(schema), "The with", "Return"]
    results = spawn_local(cli_rank, 2, (["--pipeline-ranks", "2", *argv], False), timeout_s=60, deadline_s=90)
    assert_ok(results)
    (code0, out0), (code1, out1) = [r.value for r in results]
    assert code0 == code1 == 0 and out1 == ""
    _code, out = printed(main, ["generate", *argv])
    sharded = [json.loads(line) for line in out0.splitlines()]
    single = [json.loads(line) for line in out.splitlines()]
    assert [d["tokens"] for d in sharded] == [d["tokens"] for d in single]
    assert all(d["finish_reason"] == "stop" and set(json.loads(d["text"])) == {"w", "n"} for d in sharded)
