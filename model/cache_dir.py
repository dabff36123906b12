"""Where edgeswarm keeps what it can rebuild (GGUF metadata, tokenizers, semantic bases)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EDGESWARM_CACHE"


def cache_dir() -> Path:
    """$EDGESWARM_CACHE, else ~/.cache/edgeswarm."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeswarm")
