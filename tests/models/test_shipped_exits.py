"""The exit heads shipped in ``helios_ray/assets/exits``: file, card and repository agree.

Why: the control plane takes its prior (agreement, calibration, recommended threshold) from the card, and the
replica loads the heads from the file. A card regenerated without its file (or the reverse) would make the
policy plan with numbers that describe other weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helios_ray.models.exit_files import heads_metadata
from helios_ray.models.repository import ModelRepository
from helios_ray.paths import assets_dir

SHIPPED = sorted(p.name for p in (assets_dir() / "exits").iterdir() if (p / "exits.json").exists())


def test_every_builtin_model_ships_exits() -> None:
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"} <= set(SHIPPED)


@pytest.mark.parametrize("model", SHIPPED)
def test_card_matches_heads_file(model: str) -> None:
    folder = assets_dir() / "exits" / model
    card = json.loads((folder / "exits.json").read_text())
    heads = folder / card["heads_file"]
    assert card["model"] == model
    assert heads.stat().st_size == card["heads_file_bytes"]
    assert heads.stat().st_size <= 20_000_000, "shipped heads must stay small enough for a git repository (20 MB)"
    meta = heads_metadata(heads)
    assert sorted(meta) == sorted(int(k) for k in card["exits"])
    for key, e in card["exits"].items():
        d = int(key)
        assert 1 <= d < card["total_layers"]
        assert meta[d]["kind"] == e["kind"]
        # A recommended threshold is one where the held-out agreement reached the card's target.
        if e["recommended_threshold"] is not None:
            point = [c for c in e["calibration"] if c["threshold"] == e["recommended_threshold"]]
            assert point and point[0]["agreement"] >= card["target_agreement"]
        # Trained heads beat the logit lens they replace; the whole point of shipping them.
        assert e["agreement"] > e["lens_agreement"]


@pytest.mark.parametrize("model", SHIPPED)
def test_repository_finds_shipped_exits(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty cache: the shipped file is the only one left to find.
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path))
    repo = ModelRepository()
    assert repo.exits_path(model) == assets_dir() / "exits" / model / "exits.safetensors"
