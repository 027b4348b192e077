"""``--speculate`` on the verbs: generate's output unchanged but for the draft counts in --json, a draft model by
path, chat, and the server's counters of proposed and accepted draft tokens."""

from __future__ import annotations

import io
import json
import sys

import httpx
import pytest

from serve_fixtures import metric, serve
from sirocco.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# The bundled model repeats itself here, so prompt lookup has drafts to verify and accept.
PROMPTS = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "+-------+-------+"]


def generate(capsys, *argv: str) -> tuple[list[dict], str]:
    code = main(["generate", "--json", "--no-progress", "--temperature", "0", "--max-tokens", "40", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()], err


def test_generate_speculates_with_the_same_output_and_reports_its_drafts(capsys):
    plain, _ = generate(capsys, "--backend", "cpu", *PROMPTS)
    spec, err = generate(capsys, "--speculate", "ngram", "--draft-tokens", "5", "--ngram", "2", *PROMPTS)
    assert spec[0]["accepted_tokens"] > 20                # "1, 2, ..." goes on repeating itself
    for p, s in zip(plain, spec, strict=True):
        assert "proposed_tokens" not in p
        assert s.pop("proposed_tokens") >= s.pop("accepted_tokens") >= 0
        assert s == p                                   # tokens, log-probabilities, text: the same
    assert "speculation: " in err and "draft tokens accepted" in err
    # a draft model by name (the MoE model shares the dense one's tokenizer): as slow as the target, so the
    # measured costs say drafting does not pay, and the output is plain decoding's
    by_model, err = generate(capsys, "--speculate", "sirocco-tiny-moe", PROMPTS[0])
    assert by_model[0]["accepted_tokens"] <= by_model[0]["proposed_tokens"]
    assert by_model[0]["tokens"] == plain[0]["tokens"] and by_model[0]["logprobs"] == plain[0]["logprobs"]


def test_generate_refuses_speculation_where_it_cannot_keep_the_output(capsys):
    code = main(["generate", "--speculate", "ngram", "--backend", "torch", "--no-progress", "hello"])
    assert code == 1 and "--speculate needs --backend cpu (or auto)" in capsys.readouterr().err
    code = main(["generate", "--speculate", "sirocco-tiny", "--pipeline-ranks", "2", "--no-progress", "hello"])
    assert code == 1 and "a draft model runs in one process" in capsys.readouterr().err
    code = main(["generate", "--speculate", "random-tiny", "--no-progress", "hello"])
    assert code == 1 and "draft model's tokenizer (32000 tokens) is not the model's (4096" in capsys.readouterr().err


def test_chat_speculates(capsys, monkeypatch):
    answers = []
    for extra in ([], ["--speculate", "ngram"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("1, 2, 3, 4, 5, 6,\n"))
        code = main(["chat", "--temperature", "0", "--max-tokens", "24", "--backend", "cpu", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1]


def test_serve_counts_proposed_and_accepted_draft_tokens():
    with serve("sirocco-tiny", "--speculate", "ngram", "--max-rows", "2") as (url, _):
        r = httpx.post(url + "/v1/completions", timeout=60, json={"prompt": PROMPTS[0], "max_tokens": 40,
                                                                  "temperature": 0})
        assert r.status_code == 200
        text = httpx.get(url + "/metrics").text
        proposed = metric(text, "sirocco_spec_tokens_proposed_total")
        accepted = metric(text, "sirocco_spec_tokens_accepted_total")
        assert proposed >= accepted > 0
