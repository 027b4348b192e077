"""``sirocco generate``: continue one or many prompts, in one process or over pipeline ranks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from tqdm import tqdm

from ..distributed.executor import PipelineExecutor
from ..distributed.launch import DistContext
from ..distributed.run import load_rank_stage, on_ranks, shared_from_rank0
from ..distributed.stages import parameter_bytes
from ..errors import SiroccoError
from ..generate.engine import Engine, fit_cache_len
from ..generate.grammar import Grammar, GrammarError, json_schema_grammar, validate
from ..generate.sampling import SamplingParams
from ..tokenizer.base import Tokenizer
from .options import (
    DTYPES,
    add_engine_arguments,
    add_model_arguments,
    add_pipeline_arguments,
    add_progress_argument,
    add_sampling_arguments,
    add_speculation_arguments,
    engine_backend,
    load_from_args,
    non_empty,
    speculation_from_args,
    utf8_text_file,
)

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Continue prompts with a Mistral or Mixtral model. Prompts are packed into one sequence "
                     "without padding, pre-filled in chunks and decoded over a rolling KV cache. Prompts come "
                     "from the arguments, from --prompts-file (one per line), or from standard input.")
    p.epilog = ("examples:\n"
                "  sirocco generate \"The sliding window\" \"A rolling buffer\"\n"
                "  sirocco generate --model ./mistral-7b --dtype bfloat16 --temperature 0 \"def fib(n):\"\n"
                "  sirocco generate --json --max-tokens 32 --prompts-file prompts.txt > out.jsonl\n"
                "  sirocco generate --speculate ngram --temperature 0 \"1, 2, 3, 4, 5, 6,\"\n"
                "  sirocco generate --chat --json-schema person.json \"Describe a person as JSON\"\n"
                "  echo 'Hello' | sirocco generate --stop '.'")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("prompts", nargs="*", help="prompt texts (none: read --prompts-file or standard input)")
    p.add_argument("--prompts-file", type=utf8_text_file, metavar="PATH",
                   help="a UTF-8 text file with one prompt per line")
    add_model_arguments(p)
    s = p.add_argument_group("sampling")
    add_sampling_arguments(s, max_tokens=128)
    s.add_argument("--stop", type=non_empty, action="append", default=[], metavar="TEXT",
                   help="stop a sequence when it writes TEXT (repeatable); the text ends before it")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    s.add_argument("--chat", action="store_true", help="wrap each prompt as a user message of the chat template")
    s.add_argument("--json-schema", type=json_schema_file, metavar="FILE",
                   help="constrain every answer to JSON valid against the JSON schema in FILE (compact: ', ' and "
                        "': ' separators, no other whitespace); the schema is read strictly (objects without "
                        "additionalProperties take no other keys), and a keyword that cannot be enforced is an "
                        "error")
    e = p.add_argument_group("engine")
    add_engine_arguments(e)
    add_speculation_arguments(p.add_argument_group("speculative decoding"))
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt and line: prompt, prompt_tokens, tokens, text, "
                        "logprobs, finish_reason (and proposed_tokens, accepted_tokens with --speculate)")
    add_progress_argument(o)
    add_pipeline_arguments(p)


def json_schema_file(path: str) -> Grammar:
    """``--json-schema``'s value: the file's schema as a grammar, checked while the options are parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path} is not valid JSON: {e}") from None
    try:
        grammar = json_schema_grammar(schema, strict=True)
        validate(grammar)
    except GrammarError as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from None
    return grammar


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:     # checked when parsed; changed since
            raise SiroccoError(f"cannot read --prompts-file: {e}") from None
    elif not sys.stdin.isatty():
        lines = [line.rstrip("\n") for line in sys.stdin]
    else:
        raise SiroccoError("no prompt: give prompts as arguments, --prompts-file, or on standard input")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise SiroccoError("no prompt: the input has only empty lines")
    return prompts


def run(args: argparse.Namespace) -> int:
    if args.pipeline_ranks > 1:
        if args.speculate not in (None, "ngram"):
            raise SiroccoError("--speculate with a draft model runs in one process: over --pipeline-ranks, "
                               "--speculate ngram")
        return on_ranks(args, lambda ctx: run_on_rank(args, ctx))
    prompts = read_prompts(args)
    loaded = load_from_args(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = Engine(model, tokenizer, max_rows=args.max_rows, chunk_size=args.chunk_size,
                    max_seq_len=cache_len(args, model.args.max_seq_len, tokenizer, prompts),
                    max_batch_tokens=args.max_batch_tokens, speculation=speculation_from_args(args, loaded))
    return generate_and_print(args, engine, tokenizer, prompts)


def run_on_rank(args: argparse.Namespace, ctx: DistContext) -> int:
    """The verb on one rank of a pipeline of ``args.pipeline_ranks`` processes under torchrun."""
    prompts = shared_from_rank0(ctx, lambda: read_prompts(args), "prompts")
    stage, tokenizer, source = load_rank_stage(args.model, ctx, DTYPES[args.dtype], args.quantize,
                                               backend=engine_backend(args), prefill=args.attention)
    log.info("rank %d: loaded %s, %.1f MiB of parameters", ctx.rank, source, parameter_bytes(stage) / 2**20)
    executor = PipelineExecutor(stage, ctx, micro_batches=args.micro_batches)
    engine = Engine(stage, tokenizer, max_rows=args.max_rows, chunk_size=args.chunk_size,
                    max_seq_len=cache_len(args, stage.args.max_seq_len, tokenizer, prompts),
                    max_batch_tokens=args.max_batch_tokens, executor=executor, speculation=speculation_from_args(args))
    return generate_and_print(args, engine, tokenizer, prompts, speak=ctx.rank == 0,
                              where=f" over {ctx.world_size} pipeline ranks")


def generate_and_print(args: argparse.Namespace, engine: Any, tokenizer: Tokenizer, prompts: list[str],
                       speak: bool = True, where: str = "") -> int:
    """Run ``engine`` (an Engine, or any engine with its ``stream`` and ``stats``) over the prompts with the
    command line's sampling options; print the results (streamed if there is one prompt and no --json) and
    the speed. ``speak=False`` runs without printing (the other ranks of a pipeline)."""
    inputs = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts] if args.chat else prompts
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed + i, stop=tuple(args.stop),
                             stop_on_eos=not args.ignore_eos, constraint=getattr(args, "json_schema", None))
              for i in range(len(prompts))]
    bar = tqdm(total=len(prompts) * args.max_tokens, unit="tok", desc="generating", file=sys.stderr,
               disable=True if not speak or args.no_progress else None, leave=False)
    stream_one = speak and len(prompts) == 1 and not args.json
    if stream_one:
        sys.stdout.write(prompts[0])
    results = {}
    t0 = time.perf_counter()
    for event in engine.stream(inputs, params):
        bar.update(1)
        if stream_one:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.completion is not None:
            c = event.completion
            c.prompt = prompts[c.index]
            bar.update(args.max_tokens - len(c.tokens))
            results[c.index] = c
    bar.close()
    elapsed = time.perf_counter() - t0
    if not speak:
        return 0
    for i in range(len(prompts)):
        c = results[i]
        if args.json:
            print(json.dumps(c.to_json(), ensure_ascii=False))
        elif stream_one:
            print()
        else:
            print(f"--- [{i}] {c.finish_reason}, {len(c.tokens)} tokens\n{c.prompt}{c.text}\n")
    st = engine.stats
    generated = sum(len(c.tokens) for c in results.values())
    print(f"sirocco: {len(prompts)} prompts{where}, {st.prefill_tokens} prompt tokens pre-filled at "
          f"{st.prefill_tps:.0f} tok/s, {generated} tokens generated, decode {st.decode_tps:.2f} tok/s, "
          f"{elapsed:.2f} s in all", file=sys.stderr)
    if getattr(engine, "speculator", None) is not None:
        share = st.accepted_tokens / st.proposed_tokens if st.proposed_tokens else 0.0
        print(f"sirocco: speculation: {st.accepted_tokens} of {st.proposed_tokens} draft tokens accepted "
              f"({share:.0%}), in {st.draft_steps} of {st.decode_steps} decode steps", file=sys.stderr)
    return 0


def cache_len(args: argparse.Namespace, model_max: int, tokenizer: Tokenizer, prompts: list[str]) -> int:
    """The cache this run needs (see ``fit_cache_len``)."""
    if args.chat:
        return model_max
    return fit_cache_len(model_max, [len(tokenizer.encode(p)) for p in prompts], args.max_tokens)
