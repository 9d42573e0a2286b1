"""The CLI: listings, registrations, and bad input answered with one clear line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helios_ray.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_models_json_lists_builtins_with_metadata(capsys):
    rc, out, _ = _run(capsys, "models", "--json")
    assert rc == 0
    models = {m["name"]: m for m in json.loads(out)}
    assert {"smollm2-135m", "gemma3-270m"} <= set(models)
    smol = models["smollm2-135m"]
    assert smol["prepared"] and smol["num_layers"] == 30 and smol["hidden_size"] == 576
    assert smol["kv_bytes_per_token_per_layer"] == 2 * 3 * 64 * 4
    assert smol["layer_bytes"] == 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)


@pytest.mark.parametrize(
    "args, message",
    [
        (("inspect", "no-such-model"), "unknown model 'no-such-model'"),
        (("inspect", "smollm2-135m", "--depth", "0"), "depth 0 is out of range"),
        (("inspect", "smollm2-135m", "--depth", "31"), "depth 31 is out of range"),
        (("generate", "smollm2-135m", "--prompt", "hi", "--max-tokens", "0"), "--max-tokens must be >= 1"),
        (("generate", "smollm2-135m", "--prompt", "hi", "--threshold", "1.5"), "--threshold must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, args, message):
    rc, out, err = _run(capsys, *args)
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_model_package_and_unprepared_model(capsys, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - {name: ghost, source: package, package: helios_no_such_package, file: x.gguf}\n"
        f"  - {{name: empty-dir, source: hf_dir, path: {tmp_path}}}\n"
    )
    rc, _, err = _run(capsys, "inspect", "ghost", "--models-file", str(models))
    assert rc == 2 and "helios_no_such_package" in err and "not installed" in err
    rc, _, err = _run(capsys, "prepare", "ghost", "--models-file", str(models))
    assert rc == 2 and "helios_no_such_package" in err and "not installed" in err
    rc, out, _ = _run(capsys, "models", "--json", "--models-file", str(models))
    ghost = {m["name"]: m for m in json.loads(out)}["ghost"]
    assert not ghost["prepared"] and "not installed" in ghost["problem"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: x, source: gguf}\n")
    rc, _, err = _run(capsys, "models", "--models-file", str(bad))
    assert rc == 2 and "needs path" in err


def test_registered_hf_dir_and_single_safetensors_file(capsys, tmp_path, smollm2_dir):
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        f"  - {{name: my-smol, source: hf_dir, path: {smollm2_dir}}}\n"
        f"  - {{name: my-file, source: safetensors, path: {smollm2_dir / 'model.safetensors'}, config_dir: {smollm2_dir}}}\n"
    )
    env = ["--models-file", str(models)]
    rc, out, err = _run(capsys, "inspect", "my-smol", "--depth", "4", "--json", *env)
    assert rc == 0, err
    assert json.loads(out)["loaded_layers"] == 4
    import os

    os.environ["HELIOS_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        rc, _, err = _run(capsys, "prepare", "my-file", *env)
        assert rc == 0, err
        rc, out, err = _run(capsys, "inspect", "my-file", "--depth", "2", "--json", *env)
        assert rc == 0, err
        assert json.loads(out)["total_layers"] == 30
    finally:
        del os.environ["HELIOS_CACHE_DIR"]


def test_gemma_base_model_answers_chat_in_plain_turns(capsys):
    """A base model has no chat template: --chat renders plain turns (models/prompts.py) instead of refusing."""
    rc, out, err = _run(capsys, "generate", "gemma3-270m", "--depth", "2", "--chat", "--prompt", "hi",
                        "--max-tokens", "3", "--json")
    assert rc == 0, err
    assert json.loads(out)["prompt_tokens"] > 3  # "User: hi\n\nAssistant:" and <bos>, not just "hi"


@pytest.mark.slow
def test_real_entry_point_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "helios_ray.cli", "generate", "nope", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "helios-ray generate: error: unknown model 'nope'; registered models: gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m"


@pytest.mark.slow
def test_profile_runs_real_models_and_prints_pht_and_choice(capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    rc, out, err = _run(capsys, "profile", "--candidates", "smollm2-135m,gemma3-270m", "--prompts", "1",
                        "--max-tokens", "4", "--trace-out", str(trace), "--json")
    assert rc == 0, err
    res = json.loads(out)
    models = {e["model"] for e in res["pht"]}
    assert models == {"smollm2-135m", "gemma3-270m"}
    assert res["choice"]["model"] in models and res["choice"]["depth"] >= 1
    # every candidate's own depth under the guard; the winner's equals the choice
    assert set(res["depths"]) == models and res["depths"][res["choice"]["model"]]["depth"] == res["choice"]["depth"]
    lines = trace.read_text().splitlines()
    assert sum('"type":"token"' in ln for ln in lines) == 8  # 4 tokens x 2 models (EOS may not come that early)
    rc, out, err = _run(capsys, "profile", "--candidates", "smollm2-135m", "--slo", "speed")
    assert rc == 2 and "unknown SLO 'speed'" in err


def test_simulate_replays_the_recorded_real_trace(capsys):
    from pathlib import Path

    trace = Path(__file__).resolve().parent / "data" / "traces" / "chat_then_code.jsonl"
    rc, out, err = _run(capsys, "simulate", "--trace", str(trace), "--slo", "throughput", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["decisions"] and res["decisions"][0]["action"] == "deploy"
    rc, _, err = _run(capsys, "simulate", "--trace", "/nonexistent.jsonl", "--slo", "throughput")
    assert rc == 2 and "error" in err and "Traceback" not in err
