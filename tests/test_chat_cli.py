"""``sirocco chat`` with standard input from a pipe: each line is a user turn of one conversation, answered with
the chat template exactly as ``generate --chat`` encodes it, then the verb exits; /reset and /system work."""

from __future__ import annotations

import io
import sys

import pytest

from serve_fixtures import generate_json, write_checkpoint
from sirocco.cli import main
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.pretrained import load

pytestmark = pytest.mark.usefixtures("one_thread")
MAX = "8"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("mistral", tmp_path_factory.mktemp("chat") / "tiny-mistral")


def chat(capsys, monkeypatch, ckpt, text: str, *options: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(["chat", "--model", str(ckpt), "--temperature", "0", "--max-tokens", MAX, *options])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def greedy(ckpt, messages: list[dict]) -> str:
    loaded = load(str(ckpt))
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=1)
    return engine.generate([loaded.tokenizer.encode_chat(messages)], SamplingParams(max_tokens=int(MAX)))[0].text


def test_piped_lines_are_turns_of_one_conversation(capsys, monkeypatch, ckpt):
    first = generate_json(ckpt, ["Hello"], "--chat", "--max-tokens", MAX)[0]["text"]
    second = greedy(ckpt, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "Who are you?"}])
    out = chat(capsys, monkeypatch, ckpt, "Hello\n\nWho are you?\n")
    assert out == f"{first}\n{second}\n"


def test_reset_and_system_start_new_conversations(capsys, monkeypatch, ckpt):
    first = generate_json(ckpt, ["Hello"], "--chat", "--max-tokens", MAX)[0]["text"]
    with_system = greedy(ckpt, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    out = chat(capsys, monkeypatch, ckpt, "Hello\n/reset\nHello\n/system Be brief.\nHello\n/exit\nnever read\n")
    assert out == f"{first}\n{first}\n{with_system}\n"


def test_an_interrupted_answer_stops_and_the_conversation_goes_on(ckpt, capsys):
    from sirocco.cli.chat import Chat

    loaded = load(str(ckpt))
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=1)
    chat = Chat(engine, loaded.tokenizer, SamplingParams(max_tokens=40, stop_on_eos=False))
    full = greedy_n(ckpt, [{"role": "user", "content": "Hello"}], 40)

    class StopAfterTwo(io.StringIO):        # what Ctrl-C does between steps: set the flag the answer loop reads
        def write(self, s):
            if len(self.getvalue()) > 2:
                chat.interrupted = True
            return super().write(s)

    out = StopAfterTwo()
    partial = chat.answer("Hello", out)
    assert full.startswith(partial) and len(partial) < len(full)
    assert "[stopped]" in capsys.readouterr().err
    assert engine.num_running == 0 and not engine.has_unfinished()          # its row is free
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    chat.answer("Again", io.StringIO())                                       # and the chat goes on
    assert len(chat.messages) == 4


def greedy_n(ckpt, messages: list[dict], n: int) -> str:
    loaded = load(str(ckpt))
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=1)
    return engine.generate([loaded.tokenizer.encode_chat(messages)], SamplingParams(max_tokens=n,
                                                                                     stop_on_eos=False))[0].text


def test_each_turn_continues_from_the_last_turns_state(ckpt):
    """The engine's prefix store keeps the conversation between turns: a turn pre-fills only the last answer and
    its own message, and answers as a cold pre-fill of its whole prompt does."""
    from sirocco.cli.chat import Chat

    loaded = load(str(ckpt))
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=1, prefix_cache_bytes=2**24)
    chat = Chat(engine, loaded.tokenizer, SamplingParams(max_tokens=int(MAX)), system="Answer in one line.")
    previous = 0
    for text in ("Tell me how a rolling buffer keeps the last keys.", "And the values?", "Why a window?"):
        prompt = loaded.tokenizer.encode_chat([{"role": "system", "content": chat.system}, *chat.messages,
                                               {"role": "user", "content": text}])
        stats = (engine.stats.prefill_tokens, engine.stats.cached_tokens)
        answer = chat.answer(text, io.StringIO())
        assert (engine.stats.prefill_tokens - stats[0], engine.stats.cached_tokens - stats[1]) == (
            len(prompt) - previous, previous)
        assert answer == greedy(ckpt, [{"role": "system", "content": chat.system}, *chat.messages[:-1]])
        previous = len(prompt)
    assert previous > 40 and len(engine.prefix) == 3      # a window of 16: each turn's ring is kept


def test_the_chat_verb_keeps_a_prefix_store(ckpt, monkeypatch, capsys):
    made = []
    original = Engine.__init__

    def spy(self, *a, **kw):
        made.append(kw.get("prefix_cache_bytes"))
        original(self, *a, **kw)
    monkeypatch.setattr(Engine, "__init__", spy)
    chat(capsys, monkeypatch, ckpt, "Hello\n", "--prefix-cache-mib", "3")
    chat(capsys, monkeypatch, ckpt, "Hello\n", "--prefix-cache-mib", "0")
    assert made == [3 * 2**20, 0]
