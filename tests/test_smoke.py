"""The plain-install smoke stage (tests/smoke.py, run by ``make smoke`` in a venv without the test extras): it
has a step for every verb and every picture kind, imports nothing but the standard library, and fails on a
traceback even when the command's exit status is 0. Nothing here runs a verb."""

import ast
import sys
from pathlib import Path

import pytest

from sirocco.cli import COMMANDS
from sirocco.viz import KINDS

import smoke


def test_every_verb_has_a_step():
    assert {verb for verb, _, _ in smoke.STEPS} == set(COMMANDS)


def test_every_picture_kind_is_drawn():
    assert list(smoke.VIZ) == list(KINDS)


def test_the_script_imports_only_the_standard_library():
    tree = ast.parse(Path(smoke.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    modules |= set(smoke.CORPUS_MODULES)            # imported by name for their docstrings
    assert "json" in modules and all(m.split(".")[0] in sys.stdlib_module_names for m in modules), modules


@pytest.mark.parametrize("code, out, err", [(1, "", "sirocco generate: error: ..."),
                                            (0, "", "Traceback (most recent call last):\n  File ...")])
def test_a_failing_or_tracebacked_command_fails_its_step(code, out, err):
    with pytest.raises(smoke.StepFailed, match="sirocco generate: " + ("exit status 1" if code else "a traceback")):
        smoke.check(["sirocco", "generate"], code, out, err)
