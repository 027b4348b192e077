"""Measured figures live in docs/performance.md, not in the source: no comment or docstring of src/sirocco (Python,
the C++ of the backends, the recipes' TOML) states a rate, a time or a speed-up, or narrates which host measured
what when.

A figure belongs to a machine and a day; in a comment it goes stale without anyone noticing, while the reason it
supported stays true. So comments keep the reason and point to docs/performance.md for the numbers. Only comments
and docstrings are read: code, including strings that format a rate for output, is not.
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

import sirocco

ROOT = Path(sirocco.__file__).parent

_NUM = r"\d+(?:[.,]\d+)?"
_RANGE = rf"{_NUM}(?:\s?(?:-|to|–)\s?{_NUM})?"
# Each pattern names what it found; all are case-insensitive and matched line by line.
PATTERNS = {
    # a number, at most two words, then a rate unit: "31 GB/s", "11.4 decode tokens/s", "605-646 tok/s"
    "rate": rf"{_RANGE}\s?(?:[a-z-]+\s+){{0,2}}(?:k\s?)?(?:tok(?:en)?s?|[kmgt]i?b|[gt]?flops?|rows?|calls?)/s\b",
    # a duration: "0.31 ms", "20 us", "2-3 ms", "1.1 s" (whole seconds and minutes are left alone: they are
    # timeouts and intervals, design parameters, more often than measurements)
    "time": rf"(?<![\w.]){_RANGE}\s?(?:ms|us|µs|ns|milliseconds?|microseconds?)\b|(?<![\w.]){_NUM}\.\d+\s?s\b",
    # a ratio of speeds: "1.5x faster", "2.38x the rate", "0.7x bf16's tokens/s", "3 times slower"
    "speed-up": rf"(?<![\w.]){_NUM}\s?(?:x|×|times)\s+(?:faster|slower|quicker|as fast"
                rf"|the (?:rate|speed|time|throughput)|[\w']+(?:'s)? (?:tok(?:en)?s?/s|rate|speed|throughput|time))\b",
    # a percentage of speed: "15% faster", "+4.7% at one row", "73% of its bound"
    "percent": rf"{_NUM}\s?%\s+(?:faster|slower|quicker|more throughput|of (?:the|its|their) (?:bound|time|step))\b"
               rf"|[+-]{_NUM}\s?%\s+(?:at|in|on|for)\b",
    # a measurement's host or history: "on a 2-core Xeon", "Since then", "on the same AMX host later"
    "history": r"\b\d+-core\b|\bsince then\b|\bhost later\b|\bon the same (?:amx|avx[\w-]*|xeon|epyc|kind of) host"
               r"|\b(?:measured|ran) on (?:a|an|the) (?:[\w-]+ )*?(?:xeon|epyc|ryzen|core i\d|[\w-]+ host)\b",
}
_COMPILED = {name: re.compile(p, re.IGNORECASE) for name, p in PATTERNS.items()}
# A speed ratio written without a unit ("0.7x", "1.0-1.15x") on a line that speaks of speed.
_BARE_RATIO = re.compile(rf"(?<![\w.]){_NUM}(?:\s?-\s?{_NUM})?x(?![\w])", re.IGNORECASE)
_SPEED_WORDS = re.compile(r"\b(?:faster|slower|speed(?:-?up)?|throughput|tok(?:en)?s?/s|rate|bound)\b", re.IGNORECASE)


def figures_in(text: str) -> list[str]:
    """The kinds of measured figure this line of comment or docstring states, [] when it states none.

    >>> figures_in("one stream, 35-42 GB/s; R = 2 or 4 gave 26-34")
    ['rate']
    >>> figures_in("a 2x2 tile of (T, H, D) rows, 0x7FFF added")
    []
    """
    found = [name for name, pattern in _COMPILED.items() if pattern.search(text)]
    if "speed-up" not in found and _BARE_RATIO.search(text) and _SPEED_WORDS.search(text):
        found.append("speed-up")
    return found


def python_comments(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and of every line of every docstring: a string that stands as a statement
    of its own (a module's, class's or function's first statement, or one after an attribute). Strings that are
    part of code (an f-string printing "tok/s") are not returned."""
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            end = node.end_lineno or node.lineno
            out += [(i, lines[i - 1]) for i in range(node.lineno, end + 1)]
    return sorted(out)


def cpp_comments(source: str) -> list[tuple[int, str]]:
    """(line, text) of every // and /* */ comment of a C++ source, one entry per line; string and character
    literals are skipped, so a "//" inside one is not a comment."""
    out: list[tuple[int, str]] = []
    i, line, n = 0, 1, len(source)
    while i < n:
        c = source[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in "\"'":
            i += 1
            while i < n and source[i] != c and source[i] != "\n":
                i += 2 if source[i] == "\\" else 1
            i += 1
        elif source.startswith("//", i):
            end = source.find("\n", i)
            end = n if end < 0 else end
            out.append((line, source[i:end]))
            i = end
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for k, text in enumerate(source[i:end].split("\n")):
                out.append((line + k, text))
            line += source.count("\n", i, end)
            i = end
        else:
            i += 1
    return out


def toml_comments(source: str) -> list[tuple[int, str]]:
    """(line, text) of every # comment of a TOML file (a "#" inside a one-line string is not one)."""
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        quote = ""
        for i, c in enumerate(line):
            if quote:
                quote = "" if c == quote and not (quote == '"' and line[i - 1] == "\\") else quote
            elif c in "\"'":
                quote = c
            elif c == "#":
                out.append((number, line[i:]))
                break
    return out


COMMENTS = {".py": python_comments, ".cpp": cpp_comments, ".h": cpp_comments, ".toml": toml_comments}


def scan(path: Path) -> list[str]:
    """"path:line: kinds: text" for every comment line of this file that states a measured figure."""
    comments = COMMENTS[path.suffix](path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(ROOT.parent)}:{line}: {', '.join(kinds)}: {text.strip()}"
            for line, text in comments if (kinds := figures_in(text))]


def sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*") if p.suffix in COMMENTS and p.is_file())


def test_the_scan_reads_the_sources():
    names = {p.name for p in sources()}
    assert {"runner.py", "linear.py", "kernels.py", "qlinear.cpp", "small_m_linear.cpp", "moe_plan.h",
            "sirocco-tiny.toml"} <= names


def test_no_measured_figures_in_source_comments():
    found = [hit for path in sources() for hit in scan(path)]
    assert not found, ("measured figures in source comments; keep the reason there and move the figure, with its "
                       "host, date and command, to docs/performance.md:\n" + "\n".join(found))


@pytest.mark.parametrize("text", [
    "measured on the 1B shape: 11.4 decode tokens/s loaded and run on one thread",
    "R = 1 for M = 1 (one stream, 35-42 GB/s; R = 2 or 4 gave 26-34)",
    "the model ran at 618-867 tok/s and grew",
    "bf16 matmul at 408 GFLOP/s",
    "these kernels take 0.31 ms (fp32: 0.55 against 1.9)",
    "the scalar loop cost 20 us per row of 2048",
    "2-3 ms of a step",
    "q8_0 M=8 952 -> 770 us",
    "about 1.5x faster than the loop",
    "at 8 rows about 1.5x the rate of one weight row",
    "512-row tiles 0.7x bf16's tokens/s, 1024 rows 1.0-1.15x",
    "decode reads them 15% faster",
    "int4 +4.7% at one row",
    "the build takes 1.1 s",
    "Since then the tiles are dequantized in C++",
    "On the same AMX host later (whole 1B model)",
    "measured on a 2-core Xeon with AMX",
    "measured on the AVX2 host, 1.2x",
    "autocast = 'bf16'  # about 1.5x faster than fp32 here",
])
def test_the_scan_finds_a_planted_figure(text):
    assert figures_in(text), text


@pytest.mark.parametrize("text", [
    "a 2x2 block of (T, H, D) tiles",
    "0x3F80C000 + 0x7FFF = 0x3F813FFF, high half 0x3F81",
    "Grain: about 64 KiB of weights per task, so small matrices do not pay for a second thread's start.",
    "R = 4 otherwise; 1 <= M <= 8; K = 4 x dim",
    "UPCAST_TILE_BYTES = 4 * 2**20; 1024 rows of K = 7168 is 14 MiB of bf16",
    "memory about 3x the fp32 weight",
    "polls the inbox; a rank that fails makes the others fail within --dist-timeout",
    "The timeout (default 10 minutes, --dist-timeout) and an idle rank's heartbeat every 1 second",
    "Every rank runs the same engine loop on the same host integers",
    "several times slower than fp32 ones (docs/performance.md)",
    "returns the decode rate in tok/s and the pre-fill time",
    "16 fp32 lanes; 8 x 8 int32 lanes in each 256-bit half",
    "faster than a dense mask (docs/performance.md)",
])
def test_the_scan_passes_plain_text(text):
    assert figures_in(text) == [], text


def test_only_comments_and_docstrings_are_read(tmp_path):
    source = (
        '"""Module docstring: decode at 12.5 tok/s."""\n'
        'RATE = f"{x:.1f} tok/s"          # code, not a comment\n'
        'def f():\n'
        '    """Formats the rate."""\n'
        '    return "took 3.5 ms"\n'
        'y = 1  # 20 us per call\n'
    )
    assert [line for line, text in python_comments(source) if figures_in(text)] == [1, 6]
    cpp = ('const char* s = "// 5 GB/s, not a comment";\n'
           'int x = 0;  // 31 GB/s at M = 8\n'
           '/* a block:\n   0.31 ms per layer */\n')
    assert [line for line, text in cpp_comments(cpp) if figures_in(text)] == [2, 4]
    toml = ('name = "a # 5 GB/s string"\n'
            'autocast = "bf16"    # 1.5x faster than fp32\n')
    assert [line for line, text in toml_comments(toml) if figures_in(text)] == [2]


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated one suffixed -1, -2, ..."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_links_into_performance_md_resolve():
    repo = ROOT.parent.parent
    performance = repo / "docs" / "performance.md"
    if not performance.exists():
        pytest.skip("not a source checkout")
    anchors = _anchors(performance.read_text(encoding="utf-8"))
    broken = []
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#]*)#([^)]+)\)", doc.read_text(encoding="utf-8")):
            to_performance = target.endswith("performance.md") or (doc == performance and not target)
            if to_performance and anchor not in anchors:
                broken.append(f"{doc.name}: #{anchor}")
    assert not broken, "links to missing sections of docs/performance.md: " + ", ".join(broken)
