"""The training corpora and the tokenizer trainer."""

import json
import random

import pytest
import sentencepiece as spm

from sirocco.cli import main
from sirocco.errors import SiroccoError
from sirocco.tokenizer import load_tokenizer
from sirocco.train.corpus import CorpusError, build, clean, docstrings, is_validation, load_corpus, pydoc_topics
from sirocco.train.tokenizer import train_tokenizer

FAKE_MODULE = '''"""A module about windows.

It has a long enough docstring to be kept as a document of its own."""


def slide(window, step=1, *, wrap=False):
    """Slide the window by step positions; wrap around at the end if asked to."""


def _private():
    """A private helper whose docstring is not documentation for readers at all."""


class Cache:
    """A rolling buffer cache that keeps the last W keys of every sequence in W slots."""

    def write(self, keys):
        """Slide the window by step positions; wrap around at the end if asked to."""
'''


def test_clean_normalises_text():
    assert clean("\n\r\nTitle\t \r\n\n\n\n  body \x07line  \n\n") == "Title\n\n  body line"


def test_dedup_keeps_the_first_and_drops_short_documents():
    docs = [("A sentence that is long enough to be kept, the first time.", "a"),
            ("A sentence that is long enough to be kept,   the first time.  ", "b"),   # same words
            ("too short", "c"),
            ("Another sentence that is long enough to be kept in the corpus.", "d")]
    corpus = build(docs, val_fraction=0.0)
    assert [d.source for d in corpus.train] == ["a", "d"]
    assert corpus.dropped_duplicates == 1 and corpus.dropped_short == 1


def test_split_is_deterministic_and_independent_of_order():
    docs = [(f"Document number {i} has some words in it, enough of them to count.", str(i)) for i in range(400)]
    a = build(docs, val_fraction=0.1)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    b = build(shuffled, val_fraction=0.1)
    assert sorted(d.source for d in a.val) == sorted(d.source for d in b.val)
    assert 20 <= len(a.val) <= 60                                  # about 10% of 400
    assert not {d.source for d in a.val} & {d.source for d in a.train}
    assert all(is_validation(d.text, 0.1) for d in a.val)


def test_docstrings_are_read_without_importing_and_headed_by_their_signature(tmp_path):
    pkg = tmp_path / "windows"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FAKE_MODULE)
    (pkg / "test_windows.py").write_text('"""Tests are not documentation, however long their docstring is."""')
    (tmp_path / "_hidden.py").write_text('"""A private module, whose docstring is not read by the corpus."""')
    (tmp_path / "broken.py").write_text("def (:\n")
    bodies = {}
    found = dict((source, text) for text, source in docstrings(tmp_path, bodies))
    assert list(found) == ["windows", "windows.slide", "windows.Cache", "windows.Cache.write"]
    assert found["windows.slide"].startswith("windows.slide(window, step=1, *, wrap=False)\n\nSlide the window")
    assert found["windows.Cache"].startswith("class windows.Cache\n\nA rolling buffer")
    # the two identical docstrings are duplicates even though their headings differ
    corpus = build(((t, s) for s, t in found.items()), val_fraction=0.0, dedup_body=bodies)
    assert [d.source for d in corpus.train] == ["windows", "windows.slide", "windows.Cache"]


def test_pydoc_topics_are_documents():
    topics = dict((s, t) for t, s in pydoc_topics())
    assert "topic:with" in topics and "with_item" in topics["topic:with"]


def test_folder_and_jsonl_corpora(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("The first note is long enough to stay in the corpus as a document.")
    (folder / "sub" / "b.md").write_text("The second note is long enough to stay in the corpus as well.")
    (folder / ".hidden").write_text("A hidden file is never read, even if it is long enough to be kept.")
    (folder / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    corpus = load_corpus(str(folder), val_fraction=0.0)
    assert [d.source for d in corpus.train] == ["a.txt", "sub/b.md"]

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "A JSON line with a text field that is long enough."}) + "\n\n"
                    + json.dumps("A plain JSON string on its own line, long enough too.") + "\n")
    assert len(load_corpus(str(data), val_fraction=0.0).train) == 2
    data.write_text(json.dumps({"text": "fine and long enough to be kept in the corpus"}) + "\n"
                    + json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(CorpusError, match=r"data.jsonl, line 2: an object needs a string field 'text'"):
        load_corpus(str(data))
    data.write_text("{not json\n")
    with pytest.raises(CorpusError, match="line 1: not JSON"):
        load_corpus(str(data))
    with pytest.raises(CorpusError, match="no such file or folder"):
        load_corpus(str(tmp_path / "missing"))


TEXT = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "The sliding window limits attention to the last W tokens of the sequence.",
        "A rolling buffer cache stores keys at slot p mod W, 1234567890 times."] * 20


def test_trained_tokenizer_has_mistral_special_ids_and_byte_fallback(tmp_path):
    path = train_tokenizer(TEXT, 320, tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 320 and sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    tok = load_tokenizer(path)
    text = "def window(n):\n    return 42  # ☃ never seen"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids          # byte fallback: nothing is unknown
    assert tok.decode(ids) == text
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["▁", "2", "0", "2", "4"]   # digits split
    again = train_tokenizer(TEXT, 320, tmp_path / "again.model")
    assert again.read_bytes() == path.read_bytes()                 # the same text, the same model


def test_train_tokenizer_command(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, t in enumerate(TEXT[:3]):
        (folder / f"{i}.txt").write_text(t)
    out = tmp_path / "tok" / "tokenizer.model"
    assert main(["train-tokenizer", "--corpus", str(folder), "--vocab-size", "320", "--val-fraction", "0",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == 320 and (summary["bos_id"], summary["eos_id"]) == (1, 2) and out.is_file()
    with pytest.raises(SystemExit) as exit:           # refused where the options are parsed
        main(["train-tokenizer", "--corpus", str(folder), "--vocab-size", "100", "--out", str(out)])
    assert exit.value.code == 2
    assert "argument --vocab-size: 100 is out of range: must be >= 260" in capsys.readouterr().err
    with pytest.raises(SiroccoError, match="vocab_size must be at least 260"):     # and the trainer itself
        train_tokenizer(TEXT, 100, out)
