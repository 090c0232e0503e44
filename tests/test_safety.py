"""Loading is safe: nothing in the package unpickles arbitrary objects or evaluates data as code.

    pytest tests/test_safety.py
"""

import ast
from pathlib import Path

import repforce

SRC = Path(repforce.__file__).parent


def unsafe_calls(root: Path) -> list[str]:
    """`file:line what` for every torch.load without weights_only=True, pickle/dill/marshal load(s),
    builtin eval/exec, yaml.load and numpy.load with allow_pickle=True under root."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f, kw = node.func, {k.arg: k.value for k in node.keywords}
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            true = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value is True  # noqa: E731
            bad = ((owner == "torch" and name == "load" and not true("weights_only"))
                   or (owner in ("pickle", "dill", "marshal", "cloudpickle") and name in ("load", "loads"))
                   or (owner == "yaml" and name == "load")
                   or (owner in ("np", "numpy") and name == "load" and true("allow_pickle"))
                   or (isinstance(f, ast.Name) and name in ("eval", "exec")))
            if bad:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {ast.unparse(node)[:80]}")
    return found


def test_package_loads_nothing_unsafely():
    assert unsafe_calls(SRC) == []


def test_the_scan_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("import torch, pickle\nimport numpy as np\n"
                              "a = torch.load('x')\nb = torch.load('x', weights_only=False)\nc = pickle.loads(b'')\n"
                              "d = eval('1')\ne = np.load('x', allow_pickle=True)\n"
                              "ok = torch.load('x', weights_only=True)\nm.eval()\n")
    assert [s.split()[0] for s in unsafe_calls(pkg)] == [f"pkg/m.py:{n}" for n in (3, 4, 5, 6, 7)]
