"""What a test needs from the machine: skipped on a workstation without it, failed in CI.

CI (``.ci/run`` sets CI=true) installs every tool the suite uses, so there a missing tool or module
is a broken CI image, not a reason to skip; the only skips CI accepts are for hardware it does not
have (CUDA), marked as such in the test itself.
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(why: str) -> None:
    """Skip (workstation) or fail (CI) with ``why``."""
    if in_ci():
        pytest.fail(f"{why}; CI must provide it (.ci/run installs the tools, the test extra the modules)")
    pytest.skip(why, allow_module_level=True)


def require_tool(name: str, hint: str) -> str:
    """Path of the executable ``name``; ``hint`` says how to install it."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed ({hint})")
    return path


def require_module(name: str, hint: str = "pip install -e '.[test]'"):
    """The imported module ``name``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"cannot import {name} ({exc}; {hint})")
