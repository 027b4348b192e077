"""Documents to train on, split into train and validation.

The default corpus needs no download: it is the text that ships with every Python installation,

  * the reference documentation of ``pydoc_data.topics`` (what ``help("with")`` prints), one document per
    topic, and
  * the docstrings of the standard library's modules, classes and functions, read from the source files with
    ``ast`` (nothing is imported, so no module runs), each headed by the name and signature it documents.

Any folder of text files (one document per file) or a JSONL file (one document per line: an object with a
``"text"`` field, or a plain string) can be used instead.

Every source goes through the same steps: clean (Unicode NFC, no control characters, no trailing spaces, at
most one blank line in a row), drop documents shorter than ``min_chars``, drop exact duplicates (compared on
their whitespace-normalised body, first occurrence kept), and split by a hash of the text: a document goes to
validation when its hash falls in the first ``val_fraction`` of the range. The split depends on each document
alone, not on the order or the number of documents.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import sysconfig
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SiroccoError

log = logging.getLogger(__name__)

DEFAULT = "default"
# Parts of the standard library that are not documentation prose: tests, bundled wheels, GUI demos, the
# deprecated 2to3 grammar, codec tables, and the generated topics module (read separately).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3",
              "ensurepip", "encodings", "pydoc_data", "__pycache__", "__phello__"}


class CorpusError(SiroccoError):
    """A corpus path is missing, unreadable or has no usable documents."""


@dataclass
class Document:
    text: str
    source: str              # where it came from: "topic:with", "json.dumps", "notes/a.txt", "data.jsonl:12"


@dataclass
class Corpus:
    train: list[Document] = field(default_factory=list)
    val: list[Document] = field(default_factory=list)
    dropped_short: int = 0
    dropped_duplicates: int = 0

    def describe(self) -> str:
        chars = sum(len(d.text) for d in self.train + self.val)
        return (f"{len(self.train)} train + {len(self.val)} validation documents, {chars / 1e6:.2f}M characters "
                f"({self.dropped_duplicates} duplicates and {self.dropped_short} short documents dropped)")


# -- cleaning, de-duplication and the split --------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """NFC, Unix line ends, tabs as 4 spaces, no control characters or trailing spaces, no runs of blank
    lines, no leading or trailing blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = _CONTROL.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n")


def _key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a hash of its text, not its place in the corpus."""
    h = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)
    return h < val_fraction * 16**12


def build(documents: Iterable[tuple[str, str]], val_fraction: float = 0.05, min_chars: int = 40,
          dedup_body: dict[str, str] | None = None) -> Corpus:
    """Clean, filter, de-duplicate and split ``(text, source)`` pairs.

    ``dedup_body`` maps a source to the part of its text compared for duplicates (the docstring without its
    heading); by default the whole text."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    corpus = Corpus()
    seen: set[str] = set()
    for text, source in documents:
        text = clean(text)
        body = clean((dedup_body or {}).get(source, text))
        if len(body) < min_chars:
            corpus.dropped_short += 1
            continue
        key = _key(body)
        if key in seen:
            corpus.dropped_duplicates += 1
            continue
        seen.add(key)
        doc = Document(text, source)
        (corpus.val if is_validation(text, val_fraction) else corpus.train).append(doc)
    if not corpus.train:
        raise CorpusError("no training documents left after cleaning (all shorter than "
                          f"{min_chars} characters or duplicates)")
    return corpus


# -- the default corpus ----------------------------------------------------------------------------------------
def pydoc_topics() -> Iterator[tuple[str, str]]:
    """The reference documentation topics of ``pydoc_data.topics``, one document each, sorted by name."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name], f"topic:{name}"


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:           # a construct unparse cannot render: the name alone will do
        return "(...)"


def docstrings(root: Path, heading_bodies: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Docstrings of the modules, classes and functions under ``root``, headed by what they document::

        json.dumps(obj, *, skipkeys=False, ...)

        Serialize ``obj`` to a JSON formatted ``str``. ...

    Files are read in sorted order, parsed with ``ast`` (never imported). ``heading_bodies`` receives each
    document's docstring alone, keyed by its source, for de-duplication."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("_") or rel.name.startswith("test_"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        yield from _walk(tree, module, module, heading_bodies)


def _walk(node: ast.AST, module: str, prefix: str, bodies: dict[str, str]) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(node, clean=True) if isinstance(
        node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if isinstance(node, ast.Module):
        heading = f"Module {module}"
    elif isinstance(node, ast.ClassDef):
        heading = f"class {prefix}"
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        heading = f"{prefix}{_signature(node)}"
    else:
        heading = ""
    if doc:
        source = prefix if not isinstance(node, ast.Module) else module
        bodies[source] = doc
        yield f"{heading}\n\n{doc}", source
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if child.name.startswith("_") and child.name != "__init__":
                continue               # private helpers: rarely documentation
            yield from _walk(child, module, f"{prefix}.{child.name}", bodies)


def default_corpus(val_fraction: float = 0.05, min_chars: int = 40, stdlib: Path | None = None) -> Corpus:
    """The pydoc topics and the standard library's docstrings of this Python, cleaned, de-duplicated, split."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    bodies: dict[str, str] = {}

    def documents() -> Iterator[tuple[str, str]]:
        yield from pydoc_topics()
        yield from docstrings(root, bodies)
    corpus = build(documents(), val_fraction, min_chars, bodies)
    log.info("default corpus (Python documentation topics and standard-library docstrings of %s): %s",
             root, corpus.describe())
    return corpus


# -- user corpora ----------------------------------------------------------------------------------------------
def read_folder(folder: Path) -> Iterator[tuple[str, str]]:
    """Every non-hidden file under ``folder`` that decodes as UTF-8, sorted by path; one document each."""
    skipped = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            yield path.read_text(encoding="utf-8"), str(rel)
        except (UnicodeDecodeError, OSError):
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d files that are not UTF-8 text", folder, skipped)


def read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    """One document per non-empty line: ``{"text": ...}`` or a JSON string."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}, line {n}: not JSON ({e.msg})") from None
            if isinstance(item, dict):
                if not isinstance(item.get("text"), str):
                    raise CorpusError(f"{path}, line {n}: an object needs a string field 'text'")
                item = item["text"]
            elif not isinstance(item, str):
                raise CorpusError(f"{path}, line {n}: expected an object with 'text' or a string, "
                                  f"got {type(item).__name__}")
            yield item, f"{path.name}:{n}"


def load_corpus(spec: str, val_fraction: float = 0.05, min_chars: int = 40) -> Corpus:
    """``"default"``, a folder of text files, or a ``.jsonl`` file -> the split corpus."""
    if spec == DEFAULT:
        return default_corpus(val_fraction, min_chars)
    path = Path(spec).expanduser()
    if path.is_dir():
        corpus = build(read_folder(path), val_fraction, min_chars)
    elif path.is_file() and path.suffix == ".jsonl":
        corpus = build(read_jsonl(path), val_fraction, min_chars)
    elif path.is_file():
        raise CorpusError(f"corpus {spec}: a file must be JSONL (*.jsonl); give a folder for plain text files")
    else:
        raise CorpusError(f"corpus {spec}: no such file or folder (or use '{DEFAULT}' for the Python docs)")
    log.info("corpus %s: %s", path, corpus.describe())
    return corpus
