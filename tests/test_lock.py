"""requirements/lock.txt pins what scripts/setup.sh installs, and a locked install gets exactly it.

The installed-versions check runs where scripts/test.sh has just installed with the lock
(it exports MAEP_FAST_LOCKED=1); elsewhere (a GPU machine's own environment) it skips.
"""
from __future__ import annotations

import os
import re

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"lock line without an exact version: {line!r}"
            pins[_norm(name)] = ver
    return pins


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def test_lock_pins_every_dependency_setup_installs():
    tomllib = pytest.importorskip("tomllib")
    pins = _pins()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(meta["dependencies"]) | _requirement_names(meta["optional-dependencies"]["test"])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    wanted |= _requirement_names(re.findall(r'"([A-Za-z][\w.-]*)(?:[=<>][^"]*)?"', setup.split("-e", 1)[0]))
    wanted -= {"torch", "python3"}
    missing = sorted(w for w in wanted if w not in pins)
    assert missing == [], f"not pinned in {LOCK.name}: {missing}"
    assert "torch" not in pins  # pinned by setup.sh, so an installed CUDA torch is kept


@pytest.mark.skipif(os.environ.get("MAEP_FAST_LOCKED") != "1", reason="only right after a locked scripts/setup.sh")
def test_installed_versions_are_the_locked_ones():
    wrong = []
    for name, ver in _pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed (lock {ver})")
            continue
        if got != ver:
            wrong.append(f"{name}: {got} (lock {ver})")
    assert wrong == []
