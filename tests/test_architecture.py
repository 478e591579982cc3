"""The package's shape: layered imports with no cycles (import-linter, contracts in pyproject.toml),
and modules small enough to read."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
MAX_FUNCTION_LINES = 80


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    res = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(
    "path", sorted((ROOT / "lors_convert").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_module_is_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def _functions(source: str):
    """``(qualified name, lines from the def line to the body's end)`` of every function and method."""

    def walk(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child.end_lineno - child.lineno + 1
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(source), "")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "lors_convert").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_functions_are_short(path):
    rel = path.relative_to(ROOT).as_posix()
    long = [
        f"{name} ({lines} lines)"
        for name, lines in _functions(path.read_text())
        if lines > MAX_FUNCTION_LINES
    ]
    assert not long, f"{rel}: functions over {MAX_FUNCTION_LINES} lines, split them: {', '.join(long)}"


def test_function_length_counts_from_def_to_the_end_of_the_body():
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"class A:\n    def f(self):\n{body}\n\n\n@staticmethod\ndef g():\n    def h():\n        pass\n"
    assert dict(_functions(source)) == {"A.f": MAX_FUNCTION_LINES + 1, "g": 3, "g.h": 2}


def test_usage_errors_do_not_wait_for_torch():
    """A bad flag is answered before torch or transformers are imported (they take seconds)."""
    code = (
        "import sys\nfrom lors_convert.cli import main\nsys.argv = ['lors', 'convert', 'missing', '--rank', '0']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["2", "False", "False"], res.stdout + res.stderr
    assert "--rank must be a positive integer or 'full', got 0" in res.stderr


def test_the_library_imports_transformers_only_for_hugging_face_models():
    """Importing the conversion (and converting a model that is not a Hugging Face one) leaves
    transformers unimported: its import costs seconds, and a Conv1D is recognised without it."""
    code = (
        "import sys, torch\nimport lors_convert, lors_convert.convert_file, lors_convert.checkpoint.merge\n"
        "from tests.models import StackedMLP\n"
        "lors_convert.convert(StackedMLP(depth=3), rank=2)\n"
        "print('transformers' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["False"], res.stdout + res.stderr
