"""torchvision and timm, for the tests that check their models: `make test` installs both.

Where CI is set (CI=true), a missing one fails those tests instead of skipping them, so that a green CI run has
checked that their ResNets fuse and match; elsewhere they skip with the reason.
"""

import importlib
import os

import pytest


def require(name: str):
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return importlib.import_module(name)
    return pytest.importorskip(name)
