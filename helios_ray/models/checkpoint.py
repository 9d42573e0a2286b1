"""Read a safetensors checkpoint tensor by tensor.

Why not ``from_pretrained``: it materialises every layer.  HELIOS loads only layers [0, D), so the loader asks
for tensors by name and this class opens the (possibly sharded) files lazily and reads exactly those.  Shapes
and dtypes come from the safetensors headers, which is how the repository computes byte sizes without
reading a single weight.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (8-byte length prefix, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """A model directory: ``config.json`` plus one or more safetensors files."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.dir / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            files = [f for f in files if f.name not in ("exits.safetensors",)]
            if not files:
                raise FileNotFoundError(f"no safetensors weights in {self.dir}")
            self._files = {}
            for f in files:
                for name in read_header(f):
                    self._files[name] = f
        self._stack: ExitStack | None = None
        self._handles: dict[Path, Any] = {}

    @cached_property
    def headers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in sorted(set(self._files.values())):
            out.update(read_header(f))
        return out

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[name]["shape"])

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __enter__(self) -> "Checkpoint":
        self._stack = ExitStack()
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (and only it) into memory, optionally cast and moved."""
        f = self._files[name]
        handle = self._handles.get(f)
        if handle is None:
            handle = safe_open(str(f), framework="pt", device="cpu")
            if self._stack is not None:
                self._handles[f] = handle
        t = handle.get_tensor(name)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if str(device) != "cpu":
            t = t.to(device)
        return t
