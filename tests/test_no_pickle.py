"""No pickle in any load path: jlserve and the trainer read weights and deltas through
safetensors only. A scan of the source (AST, not grep, so comments and strings do not
count) for the ways pickle gets in: pickle-based modules, `torch.load` without
`weights_only=True`, `numpy.load(allow_pickle=True)`, pandas' `read_pickle`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("jlserve", "trainer", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _torch_load_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the torch module (`import torch as th`) and to `torch.load`
    (`from torch import load as tl`) anywhere in `tree`."""
    modules, loads = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            loads |= {a.asname or a.name for a in node.names if a.name == "load"}
    return modules, loads


def pickle_uses(source: str) -> list[str]:
    """Each way `source` could unpickle, as `line: what`."""
    found = []
    tree = ast.parse(source)
    torch_names, load_names = _torch_load_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [
                f"{node.lineno}: import {n}" for n in names if n.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            keywords = {k.arg: k.value for k in node.keywords}
            if node.func.id in load_names and not _is_true(keywords.get("weights_only")):
                found.append(
                    f"{node.lineno}: {node.func.id} (torch.load) without weights_only=True"
                )
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            keywords = {k.arg: k.value for k in node.keywords}
            target = ast.unparse(node.func)
            if node.func.attr == "load" and target.split(".")[0] in torch_names:
                if not _is_true(keywords.get("weights_only")):
                    found.append(f"{node.lineno}: {target} without weights_only=True")
            elif node.func.attr == "load" and _is_true(keywords.get("allow_pickle")):
                found.append(f"{node.lineno}: {target}(allow_pickle=True)")
            elif node.func.attr == "read_pickle":
                found.append(f"{node.lineno}: {target}")
    return found


def test_scanner_finds_each_kind_of_pickle_use():
    planted = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\nnp.load('x', allow_pickle=True)\n"
        "import pandas as pd\npd.read_pickle('x')\n"
        "import torch as th\nth.load('x')\nfrom torch import load\nload('x')\n"
        "from torch import load as tl\ntl('x', weights_only=True)\n"
    )
    assert pickle_uses(planted) == [
        "1: import pickle",
        "2: import joblib",
        "5: torch.load without weights_only=True",
        "6: torch.load without weights_only=True",
        "8: np.load(allow_pickle=True)",
        "10: pd.read_pickle",
        "12: th.load without weights_only=True",
        "14: load (torch.load) without weights_only=True",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_pickle_in_load_paths(package):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}/"
    offenders = {
        str(path.relative_to(REPO_ROOT)): uses
        for path in files
        if (uses := pickle_uses(Path(path).read_text()))
    }
    assert offenders == {}
