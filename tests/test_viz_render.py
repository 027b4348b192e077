"""Terminal grids read back to the recorded masks; every PNG is written; the data behind memory and pipeline."""

import io
from itertools import pairwise

import pytest
import torch

import sirocco.viz as viz
from sirocco.config import preset
from sirocco.viz import terminal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mask_data():
    data, _ = viz.masks(prompts=[7, 5, 6], window=3, max_tokens=3)
    return data


@pytest.mark.parametrize("colour", [False, True])
def test_rendered_masks_parse_back(mask_data, colour):
    text = terminal.render_masks(mask_data, colour=colour)
    assert ("\x1b[" in text) == colour
    grids = terminal.parse_grids(text)
    assert len(grids) == len(mask_data["steps"])
    for grid, step in zip(grids, mask_data["steps"], strict=True):
        assert grid == [[bool(a) for a in row] for row in step["allowed"]]
        assert terminal.parse_grid(terminal.render_mask_step(step, 3)) == grid


def test_mask_grid_labels_sequences_positions_slots(mask_data):
    later = next(s for s in mask_data["steps"] if s["phase"] == "later chunk")
    lines = terminal.render_mask_step(later, 3).splitlines()
    assert "later chunk" in lines[0]
    assert lines[1].split()[0] == "seq" and lines[2].split()[0] == "pos" and lines[3].split()[0] == "slot"
    assert lines[1].count("│") == len({k[0] for k in later["keys"]}) - 1     # a bar between sequences
    assert lines[3].split()[1:4] == ["0", "1", "2"]                           # seq 0's cached slots first


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert terminal.use_colour(Tty()) and not terminal.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not terminal.use_colour(Tty())


def test_other_renderings():
    data, text = viz.cache(prompts=[6], window=4, max_tokens=3)
    assert text.startswith("cache") and "*" in text
    assert data["steps"][-1]["rows"] == [[4, 5, 6, 7]]           # 6 prompt tokens + 2 fed back, S = 4
    data, text = viz.receptive_field(length=6, window=3, n_layers=4)
    assert data["reach"] == [[3, 5], [1, 5], [0, 5], [0, 5]]      # the last of 6 words sees all by layer 3
    assert data["positions"] == data["gradient"]
    assert "layer 3" in text
    data, text = viz.moe(prompts=[6, 4], max_tokens=2)
    assert len(data["layers"]) == 2 and sum(data["loads"][0]) == 2 * len(data["tokens"])
    assert "layer 0" in text


def test_memory_is_read_from_cache_tensors():
    data, text = viz.memory("mistral-7b-v0.1", lengths=[1024, 4096, 8192, 32768])
    a = preset("mistral-7b-v0.1")
    per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2            # K and V, bf16
    assert data["full"] == [n * per_token for n in data["lengths"]]
    assert data["rolling"] == [min(n, 4096) * per_token for n in data["lengths"]]
    assert "rolling" in text


@pytest.mark.slow
@pytest.mark.parametrize("schedule,stages,m", [("gpipe", 3, 2), ("1f1b", 2, 4)])
def test_pipeline_events_of_a_real_step_follow_the_schedule(schedule, stages, m):
    """Recorded from real processes: each dependency of the schedule holds on the shared clock."""
    data, text = viz.pipeline(stages=stages, micro_batches=m, tokens=8, schedule=schedule)
    ev = data["events"]
    assert len(ev) == stages * m * 2 and data["schedule"] == schedule
    end = {(e["rank"], e["kind"], e["micro_batch"]): e for e in ev}
    for (r, kind, i), e in end.items():
        if kind == "F" and r > 0:
            assert e["start"] >= end[(r - 1, "F", i)]["end"]
        if kind == "B" and r < stages - 1:
            assert e["start"] >= end[(r + 1, "B", i)]["end"]
        if kind == "B" and schedule == "gpipe":     # GPipe: every forward of the stage first
            assert e["start"] >= max(x["end"] for x in ev if x["kind"] == "F" and x["rank"] == r)
    if schedule == "1f1b":                          # 1F1B: the first stage's backward 0 before its last forward
        assert end[(0, "B", 0)]["start"] < end[(0, "F", m - 1)]["start"]
    for r in range(stages):                         # a stage runs one thing at a time
        mine = sorted((e for e in ev if e["rank"] == r), key=lambda e: e["start"])
        assert all(a["end"] <= b["start"] for a, b in pairwise(mine))
    ideal = (stages - 1) / (m + stages - 1)
    assert data["ideal_bubble"] == ideal and "ideal" in text and f"{ideal:.0%}" in text


PNG_DATA = {
    "cache": lambda: viz.cache(prompts=[6, 3], window=4, max_tokens=2)[0],
    "receptive-field": lambda: viz.receptive_field(length=6, window=3, n_layers=3)[0],
    "moe": lambda: viz.moe(prompts=[6, 4], max_tokens=2)[0],
    "pipeline": lambda: viz.pipeline(stages=2, micro_batches=3, tokens=8)[0],
    "memory": lambda: viz.memory("mistral-7b-v0.1", lengths=[2048, 4096, 8192])[0]}


@pytest.mark.parametrize("kind", viz.KINDS)
def test_every_png_is_written(tmp_path, mask_data, kind):
    assert set(PNG_DATA) | {"masks"} == set(viz.KINDS)
    data = mask_data if kind == "masks" else PNG_DATA[kind]()
    path = viz.write_png(kind, data, tmp_path / f"{kind}.png")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_kind():
    with pytest.raises(ValueError):
        viz.write_png("nope", {}, "unused.png")


def test_masks_of_a_given_model():
    from sirocco.model import build_model
    model = build_model(preset("tiny", sliding_window=[3, None]), seed=0)
    data, _text = viz.masks(prompts=[4, 2], window=None, model=model, chunk_size=4, max_tokens=1)
    assert data["window"] == 3                     # the smallest window of the model by default
    assert all(torch.tensor(s["allowed"]).sum() > 0 for s in data["steps"])
