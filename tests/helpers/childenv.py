"""The environment of a test's child Python process: $PYTHONPATH with the repository and every helper
directory pytest puts on sys.path (pyproject's pytest ``pythonpath``: the one list), so a child script
imports the same helper modules the test does.  Must not know about kvrelay."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def helper_dirs() -> list[Path]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [ROOT / e for e in tomllib.load(f)["tool"]["pytest"]["ini_options"]["pythonpath"]]


def child_env(**extra: str) -> dict[str, str]:
    """os.environ plus ``extra``, with $PYTHONPATH = the repository, the helper directories, then any
    $PYTHONPATH already set."""
    paths = [str(ROOT), *map(str, helper_dirs())]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(paths)}
