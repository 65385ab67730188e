"""The layout promises of README.md ("Layout"): `jlserve/` never imports `trainer/`, and
`jlserve/engine/` is the only code that imports vLLM. Checked on the source with `ast`
(plain and `from` imports at any depth, including inside functions, and
`importlib.import_module` / `__import__` with a literal name), so a lazy import counts."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
JLSERVE = REPO_ROOT / "jlserve"
ENGINE = JLSERVE / "engine"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                found.append((node.lineno, str(first.value)))
    return found


def imports_of(top: str, files: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(REPO_ROOT)}:{line}: {module}"
        for path in files
        for line, module in imported_modules(path)
        if module == top or module.startswith(top + ".")
    ]


def sources() -> list[Path]:
    files = sorted(JLSERVE.rglob("*.py"))
    assert len(files) > 30 and JLSERVE / "cli.py" in files  # the walk sees the package
    return files


def test_the_scanner_sees_every_kind_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import trainer\n"
        "import os, trainer.loop as tl\n"
        "from trainer.gate import x\n"
        "def f():\n"
        "    from trainer import step\n"
        "    importlib.import_module('trainer.data')\n"
        "    __import__('trainer')\n"
        "import trainers, vllm_like\n"
        "from . import trainer\n"  # relative: jlserve's own module of that name, not trainer/
    )
    lines = [line for line, name in imported_modules(probe) if name.split(".")[0] == "trainer"]
    assert lines == [1, 2, 3, 5, 6, 7]


def test_jlserve_never_imports_the_trainer():
    assert imports_of("trainer", sources()) == []


def test_only_jlserve_engine_imports_vllm():
    files = sources()
    outside = [p for p in files if ENGINE not in p.parents]
    assert imports_of("vllm", outside) == []
    assert imports_of("vllm", [p for p in files if ENGINE in p.parents])  # and engine does
