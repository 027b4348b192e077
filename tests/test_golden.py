"""``sirocco generate --json`` gives the recorded bytes (tests/golden/, written by ``python tests/golden.py write``
before a change that must not alter any output): tokens, text and log-probabilities of every run in golden.RUNS."""

from pathlib import Path

import pytest

import golden

HERE = Path(__file__).parent


@pytest.mark.slow
def test_generate_json_is_byte_identical_to_the_recorded_runs():
    assert golden.check(HERE / "golden") == []
