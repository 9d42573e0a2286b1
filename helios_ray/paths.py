"""Where helios-ray keeps files: one cache root, decided here for every layer.

The prepared model weights (``models/``), assembled GGUF sources (``sources/``), trained exits (``exits/``), the
exit-tuning work (``tuning/``) and the attention kernels built on first use (``kernels/``) all live under it.
``HELIOS_CACHE_DIR`` moves it (a read-only image, a shared volume); the default is the user's cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("HELIOS_CACHE_DIR", Path.home() / ".cache" / "helios-ray"))


def assets_dir() -> Path:
    """The files shipped inside the package (trained exits and their cards, the live page)."""
    return Path(__file__).resolve().parent / "assets"
