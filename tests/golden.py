"""The golden outputs of ``sirocco generate --json``: a set of runs whose stdout must not change, byte for byte,
when the code under them is reorganised.

    python tests/golden.py write tests/golden      # record the current outputs (do this before a refactor)
    python tests/golden.py check tests/golden      # run again and compare; exit 1 naming the runs that differ

The runs cover the bundled dense and MoE models (greedy and sampled, several prompts packed, chunks smaller than
the window so the rolling cache wraps, stop strings, int8 and int4 at load, bf16), the random demo model, and a
random checkpoint written to a temporary folder. ``tests/test_golden.py`` runs ``check``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The with statement", "Return a new dictionary", "The sliding window", "x"]

RUNS: dict[str, list[str]] = {
    "tiny-greedy": ["--temperature", "0", "--max-tokens", "80", *PROMPTS],
    "tiny-sampled": ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--max-tokens", "48",
                     *PROMPTS],
    "tiny-chunked": ["--temperature", "0", "--max-tokens", "40", "--chunk-size", "5", "--max-rows", "2",
                     "--max-batch-tokens", "7", *PROMPTS],
    "tiny-stop": ["--temperature", "0", "--max-tokens", "60", "--stop", ".", "--stop", "import", *PROMPTS[:3]],
    "tiny-dense": ["--temperature", "0.7", "--max-tokens", "30", "--attention", "dense", *PROMPTS[:2]],
    "tiny-int8": ["--quantize", "int8", "--temperature", "0", "--max-tokens", "40", *PROMPTS[:3]],
    "tiny-int4": ["--quantize", "int4", "--temperature", "0.6", "--max-tokens", "40", *PROMPTS[:3]],
    "tiny-bf16": ["--dtype", "bfloat16", "--temperature", "0", "--max-tokens", "40", *PROMPTS[:3]],
    "moe-greedy": ["--model", "sirocco-tiny-moe", "--temperature", "0", "--max-tokens", "60", *PROMPTS],
    "moe-sampled": ["--model", "sirocco-tiny-moe", "--temperature", "1.0", "--seed", "3", "--max-tokens", "40",
                    *PROMPTS],
    "moe-int4": ["--model", "sirocco-tiny-moe", "--quantize", "int4", "--temperature", "0", "--max-tokens", "30",
                 *PROMPTS[:2]],
    "demo-random": ["--model", "random-tiny", "--temperature", "0.9", "--seed", "1", "--max-tokens", "24",
                    *PROMPTS[:2]],
    "random-checkpoint": ["--model", "{checkpoint}", "--temperature", "0", "--max-tokens", "24", *PROMPTS[:3]],
    "random-checkpoint-sampled": ["--model", "{checkpoint}", "--backend", "cpu", "--temperature", "1.0",
                                  "--seed", "5", "--max-tokens", "24", *PROMPTS[:3]],
}


def write_random_checkpoint(folder: Path) -> None:
    """A random tiny Mistral (window 8, so the cache rolls) in the consolidated format, with the bundled
    tokenizer: the same bytes on every run (seeded)."""
    import shutil

    from sirocco.checkpoint import save_consolidated
    from sirocco.config import preset
    from sirocco.model import build_model
    from sirocco.pretrained import BUNDLED

    model = build_model(preset("tiny", vocab_size=4096, max_seq_len=512), seed=11)
    save_consolidated(model.state_dict(), model.args, folder)
    shutil.copy(BUNDLED / "sirocco-tiny" / "tokenizer.model", folder / "tokenizer.model")


def outputs() -> dict[str, str]:
    """Every run's standard output."""
    out = {}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random-tiny-ckpt"
        write_random_checkpoint(checkpoint)
        for name, argv in RUNS.items():
            argv = [a.replace("{checkpoint}", str(checkpoint)) for a in argv]
            cmd = [sys.executable, "-m", "sirocco.cli", "-q", "generate", "--json", "--no-progress", "--threads", "1",
                   *argv]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr}")
            out[name] = done.stdout
    return out


def check(folder: Path) -> list[str]:
    """Names of the runs whose output differs from the recorded one."""
    now = outputs()
    return [name for name, text in now.items() if (folder / f"{name}.jsonl").read_text() != text]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[1])
    if argv[0] == "write":
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in outputs().items():
            (folder / f"{name}.jsonl").write_text(text)
            print(f"{name}: {len(text.splitlines())} lines")
        return 0
    differ = check(folder)
    for name in differ:
        print(f"differs: {name}", file=sys.stderr)
    print(json.dumps({"runs": len(RUNS), "differ": differ}))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
