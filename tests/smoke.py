"""Every verb of sirocco once, on the bundled models, as someone runs them after a plain ``pip install``: the
``sirocco`` command beside the Python that runs this script, in a temporary folder, at small sizes. A step fails,
naming its verb, on a non-zero exit status or a traceback in what the command printed; the script then exits 1.

``make smoke`` runs it in ``.venv-plain``, a venv holding only the runtime dependencies, so that a module the
package needs at run time but declares only in its test extras fails ``make test`` (the suite itself runs with
the extras). This script therefore imports only the standard library, and refuses to run where a test extra is
installed. A new verb adds a step here (``tests/test_smoke.py`` checks that every verb has one).

    .venv-plain/bin/python tests/smoke.py            # what make smoke runs
    .venv-plain/bin/python tests/smoke.py --keep     # keep the folder of outputs and logs, and print its path
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

SIROCCO = Path(sys.executable).parent / "sirocco"
TEST_EXTRAS = ("pytest", "transformers", "httpx", "openai", "ruff", "mypy")     # pyproject's [test], by module
TRACEBACK = "Traceback (most recent call last)"
TIMEOUT_S = 600             # one command; a hang fails its step instead of the whole make


class StepFailed(Exception):
    pass


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(verb: str, *args: str, stdin: Optional[str] = None, cwd: Path) -> subprocess.CompletedProcess:
    """``sirocco VERB ARGS...``; its output, or StepFailed on a non-zero exit or a traceback."""
    cmd = [str(SIROCCO), verb, *args]
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT_S,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{' '.join(cmd)}: no exit after {TIMEOUT_S} s") from None
    check(cmd, done.returncode, done.stdout, done.stderr)
    return done


def check(cmd: list[str], code: Optional[int], out: str, err: str, ok: tuple[int, ...] = (0,)) -> None:
    if code not in ok or TRACEBACK in out or TRACEBACK in err:
        why = f"exit status {code}" if code not in ok else "a traceback"
        raise StepFailed(f"{' '.join(cmd)}: {why}\n--- stdout\n{tail(out)}\n--- stderr\n{tail(err)}")


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise StepFailed(what)


def bundled(name: str) -> Path:
    """A bundled model's folder inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("sirocco")
    if spec is None or spec.submodule_search_locations is None:
        raise StepFailed(f"the sirocco package is not installed for {sys.executable}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    expect((folder / "params.json").is_file(), f"{folder}: the bundled model is not in the installed package")
    return folder


CORPUS_MODULES = ("argparse", "json", "textwrap", "subprocess", "pathlib", "socket", "tempfile", "signal", "inspect",
                  "collections", "functools", "itertools", "logging", "unittest", "string", "codecs", "email",
                  "csv", "shutil", "heapq", "bisect", "random", "decimal", "fractions", "statistics", "datetime",
                  "calendar")


def write_inputs(root: Path) -> None:
    """Prompts, a text to score, and a small corpus of documents (the docstrings of standard-library modules)."""
    (root / "prompts.txt").write_text("The sliding window\nA rolling buffer, café 🙂\n", encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    docs = [(n, importlib.import_module(n).__doc__ or "") for n in CORPUS_MODULES]
    for name, doc in docs:
        (corpus / f"{name}.txt").write_text(doc, encoding="utf-8")
    (root / "text.txt").write_text("\n\n".join(doc for _, doc in docs[:3]), encoding="utf-8")


# -- the steps: one function per verb or more, each run in the same folder, in this order ----------------------
Step = Callable[[Path], Optional[str]]
STEPS: list[tuple[str, str, Step]] = []        # (verb, what, step); a step may return a note for the log


def step(verb: str, what: str) -> Callable[[Step], Step]:
    def add(fn: Step) -> Step:
        STEPS.append((verb, what, fn))
        return fn
    return add


@step("generate", "one prompt of the default model, streamed")
def generate_plain(root: Path) -> None:
    out = run("generate", "--max-tokens", "16", "--no-progress", "The sliding window", cwd=root).stdout
    expect(out.startswith("The sliding window") and len(out) > len("The sliding window\n"),
           f"generate printed {out!r}, not the prompt and its continuation")


@step("generate", "--json over --prompts-file, the bundled MoE model")
def generate_json(root: Path) -> None:
    out = run("generate", "--model", "sirocco-tiny-moe", "--json", "--max-tokens", "8", "--temperature", "0",
              "--no-progress", "--prompts-file", "prompts.txt", cwd=root).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    expect([r["prompt"] for r in rows] == ["The sliding window", "A rolling buffer, café 🙂"],
           f"generate --json gave {out!r}")


@step("convert", "the bundled model to the Hugging Face format")
def convert(root: Path) -> None:
    run("convert", str(bundled("sirocco-tiny")), "hf", "--json", cwd=root)
    expect((root / "hf" / "config.json").is_file() and (root / "hf" / "tokenizer.model").is_file(),
           "convert wrote no config.json or tokenizer.model")


@step("quantize", "q8_0 of the dense model")
def quantize_q8(root: Path) -> None:
    run("quantize", "sirocco-tiny", "q8_0.gguf", "--type", "q8_0", cwd=root)


@step("quantize", "q4_0 of the MoE model")
def quantize_q4(root: Path) -> None:
    run("quantize", "sirocco-tiny-moe", "q4_0.gguf", "--type", "q4_0", cwd=root)


@step("quantize", "llama.cpp's q4_K_M mix of the dense model")
def quantize_q4_k_m(root: Path) -> None:
    run("quantize", "sirocco-tiny", "q4_K_M.gguf", "--type", "q4_K_M", cwd=root)


@step("generate", "from each GGUF file just written")
def generate_gguf(root: Path) -> None:
    for name in ("q8_0.gguf", "q4_0.gguf", "q4_K_M.gguf"):
        out = run("generate", "--model", name, "--json", "--max-tokens", "8", "--no-progress", "The sliding window",
                  cwd=root).stdout
        expect(len(json.loads(out)["tokens"]) >= 1, f"generate --model {name} gave {out!r}")


@step("perplexity", "of the converted Hugging Face folder on a text file")
def perplexity(root: Path) -> str:
    out = run("perplexity", "--model", "hf", "--text-file", "text.txt", "--context", "128", "--stride", "64",
              "--no-progress", "--json", cwd=root).stdout
    result = json.loads(out)
    expect(result["tokens"] > 0 and result["perplexity"] > 1, f"perplexity gave {out!r}")
    return f"perplexity {result['perplexity']:.1f}"


VIZ = {"masks": [], "cache": [], "receptive-field": ["--layers", "2", "--window", "2"], "moe": [],
       "pipeline": ["--ranks", "2", "--micro-batches", "2"], "memory": []}


@step("viz", "every kind, --out without a suffix")
def viz(root: Path) -> None:
    for kind, options in VIZ.items():
        err = run("viz", kind, *options, "--out", f"pictures/{kind}", cwd=root).stderr
        png = root / "pictures" / f"{kind}.png"
        expect(png.is_file() and f"wrote pictures/{kind}.png" in err, f"viz {kind}: no {png} ({tail(err, 3)!r})")


@step("train-tokenizer", "a small vocabulary on the corpus")
def train_tokenizer(root: Path) -> None:
    run("train-tokenizer", "--corpus", "corpus", "--vocab-size", "512", "--out", "tokenizer.model", cwd=root)
    expect((root / "tokenizer.model").is_file(), "train-tokenizer wrote no tokenizer.model")


@step("train", "two steps of the bundled recipe, shrunk, then generate from the run")
def train(root: Path) -> None:
    run("train", "--recipe", "sirocco-tiny", "--out", "run", "--corpus", "corpus", "--tokenizer", "tokenizer.model",
        "--seq-len", "64", "--batch-rows", "2", "--steps", "2", "--set", "train.warmup=1",
        "--set", "train.eval_rows=2", "--no-progress", "--json", cwd=root)
    run("generate", "--model", "run", "--max-tokens", "4", "--no-progress", "The", cwd=root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@step("serve", "one completion over HTTP on 127.0.0.1, then SIGINT")
def serve(root: Path) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(SIROCCO), "serve", "--model", "sirocco-tiny", "--host", "127.0.0.1", "--port", str(port),
           "--max-rows", "2"]
    out_path, err_path = root / "serve.out", root / "serve.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                check(cmd, proc.returncode, out_path.read_text(), err_path.read_text(), ok=())
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            expect(time.monotonic() < deadline, f"serve: /health did not answer in 120 s\n{tail(err_path.read_text())}")
            time.sleep(0.3)
        body = json.dumps({"model": "sirocco-tiny", "prompt": "The sliding window", "max_tokens": 8}).encode()
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        expect(isinstance(answer["choices"][0]["text"], str) and answer["usage"]["completion_tokens"] >= 1,
               f"serve: /v1/completions answered {answer!r}")
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"serve: still running 60 s after SIGINT\n{tail(err_path.read_text())}") from None
        check(cmd, code, out_path.read_text(), err_path.read_text())
        return f"{answer['usage']['completion_tokens']} tokens served, stopped with exit status 0"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@step("chat", "two turns and /exit from a pipe")
def chat(root: Path) -> None:
    out = run("chat", "--max-tokens", "8", "--temperature", "0", stdin="Hello\nWhat did I just say?\n/exit\nignored\n",
              cwd=root).stdout
    expect(len([line for line in out.splitlines() if line.strip()]) >= 1, f"chat answered {out!r}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the folder of outputs and print its path")
    args = p.parse_args(argv)
    if not SIROCCO.is_file():
        print(f"smoke: no sirocco command beside {sys.executable}: install the package in this venv first",
              file=sys.stderr)
        return 1
    extras = [m for m in TEST_EXTRAS if importlib.util.find_spec(m) is not None]
    if extras:
        print(f"smoke: {sys.executable} has test extras installed ({', '.join(extras)}); the smoke stage runs in a "
              "venv with the runtime dependencies only (make smoke)", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="sirocco-smoke-"))
    t0 = time.perf_counter()
    try:
        write_inputs(root)
        for verb, what, fn in STEPS:
            t = time.perf_counter()
            try:
                note = fn(root)
            except Exception as e:         # StepFailed, or an answer not in the shape expected
                why = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
                print(f"smoke: {verb} FAILED ({what}):\n{textwrap.indent(why, '  ')}", file=sys.stderr)
                return 1
            print(f"smoke: {verb:<15} {time.perf_counter() - t:5.1f} s  {what}" + (f" ({note})" if note else ""),
                  flush=True)
    finally:
        if args.keep:
            print(f"smoke: outputs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    verbs = sorted({verb for verb, _, _ in STEPS})
    print(f"smoke: {len(STEPS)} steps over {len(verbs)} verbs passed in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
