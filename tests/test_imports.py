"""The package's import structure: no circle, every import runs down the layers, and function-local
imports only where they keep a heavy optional dependency off the import path, each saying so.

    pytest tests/test_imports.py
    python tests/test_imports.py [SRC/repforce]      # the counts: files, circles, imports running up, local imports

Imports are read from the source (ast), inside functions too, so an import hidden in a function
to dodge a circle is still an edge. `from . import x` is an edge to the submodule x.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "repforce"

# Lowest first. A module may import from lower layers, and from its own layer only inside its own
# subpackage (worlds.shapeseval -> worlds.shapes). "worlds.*" names every module of the subpackage.
LAYERS = [
    ["flow", "runtime", "tokenizer", "sequence"],  # leaves: math, the process, text, the sequence layout
    ["quantizer", "positions", "attention"],  # attention: the mask rule, dense or as FlexAttention blocks
    ["backbone", "encoder", "packing"],  # the networks; packed rows
    ["config", "pretrained", "vae"],
    ["model", "checkpoint", "parallelize", "datasources", "worlds.*"],
    ["presets", "engine", "data", "codebook", "trainable"],  # codebook: rep ids fitted before step 0; trainable: what trains
    ["train", "service", "exports", "lmms"],  # exports, lmms: benchmark formats over the engine
    ["study.*"],
    ["webapp"],
    ["serve"],
    ["cli"],
]
PACKAGES = ("", "worlds", "study")  # the __init__ files: no import of the package at all
# third-party modules a function may import lazily: heavy, and needed only on some paths
HEAVY = ("transformers", "diffusers", "datasets", "scipy", "tokenizers", "torch.distributed.",
         "gradio", "fastapi", "uvicorn",  # these three: `repforce serve` only (repforce[serve])
         "lmms_eval")  # repforce.lmms only (repforce[lmms])


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def imports(root: Path = ROOT) -> list[tuple[str, str, int, bool, str]]:
    """(importer, imported, line, inside a function, source line) for every import in the package.
    Package modules are named relative to the package ("worlds.shapes"); others by their top name."""
    mods = {module_name(f, root) for f in root.rglob("*.py")}
    out = []
    for f in sorted(root.rglob("*.py")):
        name = module_name(f, root)
        lines = f.read_text().splitlines()
        tree = ast.parse(f.read_text())
        local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(fn) if n is not fn}
        pkg = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        pkg = [p for p in pkg if p]
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                found = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level == 0:
                found = [n.module] if not (n.module + ".").startswith("repforce.") else [
                    f"{n.module}.{a.name}" for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = ".".join(["repforce", *pkg[: len(pkg) - (n.level - 1)], *([n.module] if n.module else [])])
                found = [f"{base}.{a.name}" for a in n.names]
            else:
                continue
            for t in dict.fromkeys(found):
                if (t + ".").startswith("repforce."):
                    t = t[len("repforce."):]
                    while t and t not in mods:  # `from .x import name`: the module is x
                        t = t.rpartition(".")[0]
                else:
                    t = "ext:" + t
                out.append((name, t, n.lineno, id(n) in local, lines[n.lineno - 1]))
    return out


def layer_of(name: str) -> int | None:
    for i, group in enumerate(LAYERS):
        for g in group:
            if name == g or (g.endswith(".*") and name.startswith(g[:-1])):
                return i
    return None


def circles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        if not b.startswith("ext:"):
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(edges) -> list[tuple[str, str]]:
    """Imports from a module to one in a higher layer, or to its own layer outside its subpackage."""
    bad = []
    for a, b, *_ in edges:
        if b.startswith("ext:") or a in PACKAGES:
            continue
        la, lb = layer_of(a), layer_of(b)
        same_pkg = "." in a and a.split(".")[0] == b.split(".")[0]
        if la is None or lb is None or lb > la or (lb == la and not same_pkg):
            bad.append((a, b))
    return bad


def test_every_module_has_a_layer():
    mods = {module_name(f, ROOT) for f in ROOT.rglob("*.py")} - set(PACKAGES)
    assert sorted(m for m in mods if layer_of(m) is None) == []


def test_no_import_circle():
    assert circles(imports()) == []


def test_imports_run_down_the_layers():
    assert upward(imports()) == []


def test_package_inits_import_nothing_of_the_package():
    assert [(a, b) for a, b, *_ in imports() if a in PACKAGES and not b.startswith("ext:")] == []


def test_function_local_imports_are_heavy_optional_and_say_so():
    local = [(a, b, line) for a, b, _, inside, line in imports() if inside]
    assert [(a, b) for a, b, _ in local if not b.startswith("ext:")] == []  # never a module of the package
    for a, b, line in local:
        assert b[len("ext:"):].startswith(HEAVY) and "#" in line and "heavy" in line, f"{a}: {line.strip()}"


def test_the_check_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks above can fail: a made-up package with a hidden circle and an import running up."""
    pkg = tmp_path / "repforce"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime.py").write_text("def f():\n    from .train import x  # dodging a circle\n")
    (pkg / "train.py").write_text("from . import runtime\nx = 1\n")
    edges = imports(pkg)
    assert circles(edges) == [["runtime", "train"]]
    assert ("runtime", "train") in upward(edges)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    edges = imports(root)
    files = sorted(module_name(f, root) for f in root.rglob("*.py"))
    local = [e for e in edges if e[3]]
    print(f"files: {len(files)} ({sum(1 for f in files if '.' not in f)} at the top)")
    print(f"import circles: {len(circles(edges))}: {circles(edges)}")
    print(f"imports running up (against the layers above): {len(upward(edges))}")
    print(f"function-local imports: {len(local)} ({sum(1 for e in local if not e[1].startswith('ext:'))} of the "
          "package itself)")
