"""``sirocco viz KIND`` end to end: each kind writes a non-empty PNG, prints its grid, and --json gives the data
in the documented shapes; a trace changes nothing in what the engine generates."""

import json

import pytest
import torch

from sirocco.cli import main
from sirocco.config import preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model
from sirocco.viz import Trace

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = {
    "masks": ["--prompts", "7,5,6", "--window", "3", "--chunk-size", "4"],
    "cache": ["--prompts", "6", "--window", "4", "--max-tokens", "5"],
    "receptive-field": ["--window", "3", "--layers", "4", "--token", "9"],
    "moe": ["--text", "The with statement"],
    "pipeline": ["--ranks", "2", "--micro-batches", "3"],
    "memory": ["--model", "sirocco-tiny"],
}


def run_viz(kind, extra, capsys):
    code = main(["-q", "viz", kind, *ARGS[kind], *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out


@pytest.mark.parametrize("kind", list(ARGS))
def test_each_kind_writes_a_png_and_prints_its_data(kind, tmp_path, capsys):
    png = tmp_path / f"{kind}.png"
    data = json.loads(run_viz(kind, ["--out", str(png), "--json"], capsys).out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    if kind == "masks":
        assert data["window"] == 3 and {"phase", "queries", "keys", "allowed"} <= set(data["steps"][0])
        step = data["steps"][1]                                  # a later chunk: keys read from the cache
        assert step["phase"] == "later chunk" and any(k[2] is not None for k in step["keys"])
        assert all(len(row) == len(step["keys"]) for row in step["allowed"])
    elif kind == "cache":
        assert data["window"] == 4 and [s["step"] for s in data["steps"]] == list(range(len(data["steps"])))
        assert all(len(row) == 4 for s in data["steps"] for row in s["rows"])
    elif kind == "receptive-field":
        assert data["window"] == 3 and data["token"] == 9
        assert data["reach"] == [[9 - 2 * layer, 9] for layer in range(1, 5)]      # W - 1 more per layer
        assert data["gradient"] == [list(range(lo, hi + 1)) for lo, hi in data["reach"]]
    elif kind == "moe":
        assert len(data["tokens"]) == len(data["text"]) and data["layers"]
        for layer in data["layers"]:
            assert all(len(e) == 2 for e in layer["experts"]) and len(layer["weights"]) == len(data["tokens"])
    elif kind == "pipeline":
        assert {e["rank"] for e in data["events"]} == {0, 1}
        assert {(e["kind"], e["micro_batch"]) for e in data["events"]} == {(k, m) for k in "FB" for m in range(3)}
    else:
        assert data["window"] == 64 and data["rolling"][-1] < data["full"][-1]


def test_terminal_grid_without_colour_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = run_viz("masks", [], capsys).out
    assert "\x1b[" not in out and "first chunk" in out and "■" in out


@pytest.mark.parametrize("argv,option", [(["--prompts", "3,0"], "--prompts"), (["--window", "0"], "--window"),
                                         (["--token", "-1"], "--token")])
def test_bad_values_are_refused_by_the_parser(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["viz", "masks", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"sirocco viz: error: argument {option}" in err and "Traceback" not in err


def test_out_without_a_suffix_gets_png_and_the_message_names_the_file(tmp_path, capsys):
    out = run_viz("pipeline", ["--out", str(tmp_path / "sched")], capsys)
    png = tmp_path / "sched.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sched.png"]
    assert f"sirocco viz: wrote {png} ({png.stat().st_size} bytes)" in out.err


def refused_out(out, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["viz", "pipeline", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("sirocco viz: error: argument --out: "), message
    return message


def test_an_existing_folder_as_out_is_refused_and_nothing_is_written(tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert f"{str(folder)!r} is a folder; give the PNG file to write" in refused_out(folder, capsys)
    (tmp_path / "masks.png").mkdir()                  # a folder only once .png is added
    assert "which is a folder" in refused_out(tmp_path / "masks", capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.png", "pictures"] and not any(folder.iterdir())


def test_out_with_another_suffix_is_refused_naming_png(tmp_path, capsys):
    assert "give a name ending in .png" in refused_out(tmp_path / "masks.jpg", capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["tiny", "tiny-moe"])
def test_a_trace_changes_nothing_the_engine_generates(arch):
    args = preset(arch, vocab_size=300, sliding_window=5)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (9, 3, 6)]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    runs = []
    for trace in (None, Trace()):
        engine = Engine(build_model(args, seed=1), None, max_rows=2, chunk_size=4, max_seq_len=32, trace=trace)
        runs.append([(c.tokens, c.logprobs) for c in engine.generate(prompts, params)])
    assert runs[0] == runs[1]


def test_the_cache_of_a_speculative_run_shows_drafts_rolled_back_after_the_wrap(tmp_path, capsys):
    """``--draft-tokens``: a ring of W + K slots, verify steps, rejected drafts marked rolled back (positions the row
    no longer holds), some of them after the ring has wrapped; each verify query's mask is its own window."""
    png = tmp_path / "rollback.png"
    data = json.loads(run_viz("cache", ["--max-tokens", "14", "--draft-tokens", "3", "--out", str(png), "--json"],
                              capsys).out)
    assert png.stat().st_size > 1000 and data["window"] == 4 and data["slots"] == 7
    steps = [s for s in data["steps"] if s["phase"] == "verify"]
    assert steps and any(s["rolled_back"] for s in steps)
    wrapped = [s for s in steps if s["rolled_back"] and min(s["cached"].values()) > 7]
    assert wrapped                                                      # a rollback after the ring wrapped
    for s in steps:
        cached = {int(r): c for r, c in s["cached"].items()}
        assert all(s["rows"][r][slot] >= cached[r] for r, slot in s["rolled_back"])
    masks = json.loads(run_viz("masks", ["--prompts", "6", "--window", "4", "--max-tokens", "14", "--draft-tokens",
                                         "3", "--json"], capsys).out)
    verify = [s for s in masks["steps"] if s["phase"] == "verify"]
    assert verify and max(len(s["queries"]) for s in verify) > 1
    for s in verify:
        for (_seq, p), allowed in zip(s["queries"], s["allowed"], strict=True):
            seen = sorted(k[1] for k, a in zip(s["keys"], allowed, strict=True) if a)
            assert seen == list(range(max(0, p - 3), p + 1))            # its window, no later draft
    with pytest.raises(SystemExit) as e:
        main(["viz", "moe", "--draft-tokens", "2"])
    assert "--draft-tokens draws masks and cache" in str(e.value)
