"""Imports flow one way, and no module imports itself back (docs/design.md, "Layers").

Every part of ``maep_fast`` (a subpackage or a top-level module) has a rank in
``LAYERS``; a part may import only parts of a strictly lower rank. On top of
that, the module graph (one node per ``.py`` file, packages by their
``__init__.py``) must have no cycle. Both read every ``import`` statement with
``ast``, including the lazy ones inside functions, so an import moved into a
function body cannot hide a layering break or a cycle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "maep_fast"

# lowest first; a part may import only parts of a lower rank (parts of one rank may not import each other)
LAYERS = (
    ("errors", "_checks", "_ranks", "_native"),  # exception types, argument checks, process ranks, the extension
    ("ops",),         # fused ops: references, Triton, C++ / CUDA dispatch
    ("models",),      # MaskedAutoencoderViT, presets, LoRA, classifiers, published-MAE import
    ("data",),        # ImageDataset, the loaders, the name -> loader registry
    ("checkpoint",),  # save_model / load_model (knows the model classes)
    ("attacks",),     # PGD, EOT / BPDA wrappers, torchattacks adapter
    ("purify",),      # MAEP, RandomizedMAEP, MAE-Pure, tiling, AMV
    ("train",),       # MAEP, MAE pretraining, MIMIR, classifiers, loops, distributed
    ("baselines",),   # DiffPure-style diffusion purifier
    ("evaluate",),    # threat models, sanity checks, tables
    ("plots",),       # figures
    ("demo",),        # the end-to-end demo
    ("cli",),         # maep-fast ...
    ("__init__", "__main__"),  # the public API and `python -m maep_fast`
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    return {_module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}


def _part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def _imports(module: str, is_package: bool, tree: ast.AST, modules) -> list[tuple[int, str]]:
    """(line, imported maep_fast module) for every import in ``tree``, relative ones resolved;
    ``from pkg import name`` names the submodule ``pkg.name`` when there is one."""
    base = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                bits = base.split(".")
                pkg = ".".join(bits[: len(bits) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                pkg = node.module
            targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in modules else pkg for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "maep_fast":
                continue
            while t not in modules and "." in t:  # maep_fast.x.y.Name -> the module that defines Name
                t = t.rpartition(".")[0]
            out.append((node.lineno, t))
    return out


def _graph(pkg: Path = PKG):
    """module -> {imported module: first line}, with the implicit edges: importing ``a.b.c`` runs
    ``a/__init__`` and ``a/b/__init__`` first (except packages the importer is inside of, which are
    already running)."""
    modules = _modules(pkg)
    graph = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges: dict[str, int] = {}
        for line, target in _imports(name, path.name == "__init__.py", ast.parse(path.read_text(), str(path)),
                                     modules):
            edges.setdefault(target, line)
            bits = target.split(".")
            for i in range(1, len(bits)):
                parent = ".".join(bits[:i])
                if parent not in own:
                    edges.setdefault(parent, line)
        graph[name] = edges
    return modules, graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return sorted(out)


def _back_arrows(modules, graph, pkg: Path = PKG) -> list[str]:
    out = []
    for name, edges in sorted(graph.items()):
        src = _part(name)
        for target, line in sorted(edges.items()):
            dst = _part(target)
            if dst != src and RANK[dst] >= RANK[src]:
                out.append(f"{modules[name].relative_to(pkg.parent)}:{line} ({src}, rank {RANK[src]}) imports "
                           f"{target} ({dst}, rank {RANK[dst]})")
    return out


def test_every_part_has_a_rank():
    parts = {_part(m) for m in _modules()}
    assert parts - set(RANK) == set(), "rank the new part in LAYERS"
    assert set(RANK) - parts == set(), "LAYERS names a part that no longer exists"


def test_lower_layers_never_import_higher_ones():
    modules, graph = _graph()
    assert _back_arrows(modules, graph) == []


def test_no_import_cycles_between_modules():
    _, graph = _graph()
    assert _cycles(graph) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "maep_fast"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_scanner_sees_lazy_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "from .registry import load_dataset\n",
        "data/dataset.py": "class ImageDataset: ...\n",
        "data/digits.py": "from .dataset import ImageDataset\n",
        "data/registry.py": "def load_dataset():\n    from . import digits\n",
        "train/__init__.py": "",
        "train/distributed.py": "",
        "ops/__init__.py": "def f():\n    from maep_fast.train.distributed import rank\n",
    })
    modules, graph = _graph(root)
    assert graph["maep_fast.data.registry"] == {"maep_fast.data.digits": 2}
    assert graph["maep_fast.data.digits"] == {"maep_fast.data.dataset": 1}
    assert graph["maep_fast.ops"] == {"maep_fast.train.distributed": 2, "maep_fast.train": 2}
    assert _back_arrows(modules, graph, root) == [
        "maep_fast/ops/__init__.py:2 (ops, rank 1) imports maep_fast.train (train, rank 7)",
        "maep_fast/ops/__init__.py:2 (ops, rank 1) imports maep_fast.train.distributed (train, rank 7)",
    ]
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_lazy_circle(tmp_path):
    # the shape the data package had: the registry in dataset.py imports the loaders lazily, they import dataset
    root = _tree(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "from .dataset import load_dataset\n",
        "data/dataset.py": "def load_dataset():\n    from .digits import load_digits\n",
        "data/digits.py": "from .dataset import ImageDataset\n",
    })
    _, graph = _graph(root)
    assert _cycles(graph) == [["maep_fast.data.dataset", "maep_fast.data.digits"]]


def test_cycle_finder_counts_package_inits(tmp_path):
    # a.x imports b.y, which runs b/__init__, which imports a.x back
    root = _tree(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "", "ops/x.py": "import maep_fast.models.y\n",
        "models/__init__.py": "from maep_fast.ops import x\n", "models/y.py": "",
    })
    _, graph = _graph(root)
    assert _cycles(graph) == [["maep_fast.models", "maep_fast.ops.x"]]


@pytest.mark.parametrize("module", ["maep_fast.models.mae_import", "maep_fast.checkpoint", "maep_fast.errors"])
def test_model_modules_load_without_training_code(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m.startswith('maep_fast.train')); "
            "assert not bad, bad")
    # maep_fast/__init__ imports the public API, which itself must not pull training code in either
    subprocess.run([sys.executable, "-c", code], check=True)
