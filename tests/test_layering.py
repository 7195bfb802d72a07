"""Imports flow one way (design.md): ops <- models/checkpoint <- purify/train/attacks <- cli/demo.

Scans every ``import`` statement, including ones inside functions, so a lazy
import cannot hide a layering break.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "maep_fast"

# package part -> the maep_fast parts it must never import
FORBIDDEN = {
    "ops": ("models", "checkpoint", "purify", "train", "attacks", "evaluate", "cli", "demo", "baselines", "data"),
    "models": ("purify", "train", "attacks", "evaluate", "cli", "demo", "baselines"),
    "checkpoint": ("purify", "train", "attacks", "evaluate", "cli", "demo", "baselines"),
    "_ranks": ("models", "checkpoint", "purify", "train", "attacks", "evaluate", "cli", "demo", "baselines", "ops"),
}


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] == "maep_fast" and len(bits) > 1:
                yield node.lineno, bits[1]


def _violations():
    out = []
    for path in sorted(PKG.rglob("*.py")):
        part = _part(path)
        for lineno, imported in _imported_parts(ast.parse(path.read_text(), str(path))):
            if imported in FORBIDDEN.get(part, ()):
                out.append(f"{path.relative_to(PKG.parent)}:{lineno} imports maep_fast.{imported}")
    return out


def test_lower_layers_never_import_higher_ones():
    assert _violations() == []


def test_scanner_sees_lazy_imports(tmp_path):
    tree = ast.parse("def f():\n    from maep_fast.train.distributed import rank\n")
    assert list(_imported_parts(tree)) == [(2, "train")]


@pytest.mark.parametrize("module", ["maep_fast.models.mae_import", "maep_fast.checkpoint"])
def test_model_modules_load_without_training_code(module):
    import subprocess
    import sys
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m.startswith('maep_fast.train')); "
            "assert not bad, bad")
    # maep_fast/__init__ imports the public API, which itself must not pull training code in either
    subprocess.run([sys.executable, "-c", code], check=True)
