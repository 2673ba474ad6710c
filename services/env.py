"""The one module that reads environment variables, for every package.

  FLORA_CACHE_DIR    where converted models live (default: <repo>/.cache, git-ignored)
  FLORA_*            the adapter store's settings, parsed and documented in adapters_store/settings.py
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]


def environ() -> Mapping[str, str]:
    return os.environ


def cache_root() -> Path:
    """Where downloaded or converted artifacts live: $FLORA_CACHE_DIR, else <repo>/.cache."""
    value = environ().get("FLORA_CACHE_DIR")
    return Path(value).expanduser() if value else _REPO_ROOT / ".cache"
