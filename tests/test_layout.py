"""The package's import graph: no cycle between modules, and no arrow running back up the layers of the data path
(tokens -> plan -> cache -> model -> backends -> engine/training -> distributed -> pictures/serving -> verbs)."""

import ast
import re
from itertools import pairwise
from pathlib import Path

import sirocco

ROOT = Path(sirocco.__file__).parent
# Lower layers first; a package may import its own layer's modules only inside itself, and any lower layer.
LAYERS = [["errors"], ["config"], ["plan"], ["cache"], ["model"], ["backends", "tokenizer"], ["checkpoint"],
          ["pretrained", "generate", "train"], ["distributed", "eval"], ["viz", "serve"], ["cli"]]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports() -> dict[str, set[str]]:
    """Every import of every module, at any depth (TYPE_CHECKING and function-level ones included)."""
    mods = modules()
    edges = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c in mods and c not in (name, "sirocco"):
                    found.add(c)
                    break
        edges[name] = found
    return edges


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_package_has_a_layer():
    assert {top(m) for m in modules() if "." in m} - {"__main__"} <= set(RANK) | {"py"}, \
        sorted({top(m) for m in modules() if "." in m} - set(RANK))


def test_no_arrow_runs_back_up_the_layers():
    bad = [(a, b) for a, bs in imports().items() for b in bs
           if top(a) and top(b) and top(a) != top(b) and RANK[top(a)] <= RANK[top(b)]]
    assert not bad, bad


def test_no_import_cycle_between_modules():
    edges = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # A package's __init__ re-exporting its submodules is not a cycle of the code's logic: only count cycles
    # that do not pass through a package's own __init__ importing its children.
    real = [c for c in cycles if not any(a == b.rsplit(".", 1)[0] for a, b in pairwise(c))]
    assert not real, real


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT.parents[1] / "README.md").read_text()
    section = readme[readme.index("## How it is laid out"):]
    section = section[:section.index("\n## ", 3)]
    listed = set(re.findall(r"^\| `([\w.]+/?)` \|", section, flags=re.M))
    tree = {p.name + ("/" if p.is_dir() else "") for p in ROOT.iterdir()
            if p.name not in ("__init__.py", "py.typed", "__pycache__") and (p.is_dir() or p.suffix == ".py")}
    assert listed == tree, (sorted(tree - listed), sorted(listed - tree))
