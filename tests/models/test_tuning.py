"""Exit tuning end to end on a tiny random Llama: training really helps, the card is sane, resume is exact,
the runtime loads what the tuner wrote and computes the same agreement, and bad input is one clear line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helios_ray.cli import main
from helios_ray.tuning import run as T
from helios_ray.tuning.calibration import TARGET_AGREEMENT, THRESHOLDS, calibration, recommend_threshold
from helios_ray.tuning.config import ExitSpec, TuneConfig, parse_exits
from helios_ray.tuning.train import build_head, train_head

WORDS = ("the cat sat on a mat while two dogs ran past her old red house near river banks. "
         "we saw 3 birds and 12 fish; then it rained! who knows why? she said: go home now, ok.").split()


def _char_tokenizer(out: Path) -> None:
    """A character-level fast tokenizer (78 ids) that fits the tiny model's 160-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-\n"
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{c: i + 3 for i, c in enumerate(chars)}}  # Llama: eos = 2
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(out)


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    """A registered tiny model ("tiny-llama", 5 layers) with a tokenizer, a data file, and one tuning run."""
    src, _ = tiny_dir("llama")
    root = tmp_path_factory.mktemp("tune")
    model_dir = root / "tiny-llama"
    shutil.copytree(src, model_dir)
    _char_tokenizer(model_dir)
    models_file = root / "models.yaml"
    models_file.write_text(f"models:\n  - name: tiny-llama\n    source: hf_dir\n    path: {model_dir}\n")
    rng = random.Random(0)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for i in range(400):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("HELIOS_CACHE_DIR", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation on a shared 2-core box
    out = cache / "exits" / "tiny-llama"  # where the runtime looks for a model's trained heads
    # fp32 compute: the runtime test below compares the card with fp32 serving to 2e-3
    args = ["tune-exits", "tiny-llama", "--exits", "2:linear,3,4:healed2", "--heal-rank", "8",
            "--compute-dtype", "float32", "--data", str(data), "--tokens", "5000",
            "--seq-len", "48", "--batch-tokens", "192", "--steps", "60", "--lr", "3e-3", "--eval-conversations", "24",
            "--eval-seq-len", "48", "--eval-stride", "1", "--work-dir", str(root / "work"), "--out", str(out),
            "--models-file", str(models_file), "--no-progress", "--json"]
    yield {"root": root, "models_file": models_file, "data": data, "out": out, "args": args, "work": root / "work"}
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def card(tiny):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(tiny["args"])
    assert rc == 0
    return json.loads(buf.getvalue())


def test_training_lowers_the_loss_and_beats_the_logit_lens(card):
    for d in ("2", "3", "4"):
        e = card["exits"][d]
        assert e["kl_last"] < 0.9 * e["kl_first"], e
        # a real improvement on held-out text, not noise: the untrained head *is* (or is near) the lens
        assert e["agreement"] >= e["lens_agreement"] + 0.05, e
    assert card["exits"]["2"]["kind"] == "linear" and card["exits"]["3"]["kind"] == "block"
    assert card["exits"]["4"]["kind"] == "healed" and card["exits"]["4"]["layers"] == 2


def test_card_fields_and_calibration_table_are_sane(card, tiny):
    assert card["model"] == "tiny-llama" and card["total_layers"] == 5 and card["format"] == T.CARD_FORMAT
    assert card["data"]["train_tokens"] >= 5000 and card["data"]["heldout_rows"] > 0
    for d, e in card["exits"].items():
        assert {"kind", "parameters", "train_tokens", "agreement", "lens_agreement", "calibration",
                "recommended_threshold", "threshold_check"} <= set(e)
        assert e["parameters"] > 0 and 0.0 <= e["agreement"] <= 1.0
        cal = e["calibration"]
        assert [r["threshold"] for r in cal] == list(THRESHOLDS)
        assert all(set(r) == {"threshold", "coverage", "agreement"} for r in cal)  # = control.CalibrationPoint
        cov = [r["coverage"] for r in cal]
        assert all(0.0 <= c <= 1.0 for c in cov) and cov == sorted(cov, reverse=True)
        thr = e["recommended_threshold"]
        assert all(r["agreement"] is None if r["coverage"] == 0 else 0.0 <= r["agreement"] <= 1.0 for r in cal)
        if thr is not None:
            row = next(r for r in cal if r["threshold"] == thr)
            assert row["agreement"] >= TARGET_AGREEMENT
    assert card["exits"]["3"]["extra_kv_layers"] == 1 and card["exits"]["2"]["extra_kv_layers"] == 0
    # healed: only the deltas are stored (2 layers x 7 projections x rank 8), nothing extra when served
    assert card["exits"]["4"]["extra_kv_layers"] == 0 and card["exits"]["4"]["serving_extra_bytes"] == 0
    from helios_ray.control import ExitPrior

    for e in card["exits"].values():  # the control plane reads the card as its prior (rows with tokens)
        ExitPrior(agreement=e["agreement"], calibration=[r for r in e["calibration"] if r["agreement"] is not None])


def test_runtime_loads_the_tuned_head_and_reproduces_the_card(card, tiny):
    """load_model(depth=3) finds the new head in the cache by itself; its greedy-exit argmax over the held-out
    rows agrees with the full model exactly as often as the card says (training and serving compute the same)."""
    from helios_ray.models.early_exit import load_model
    from helios_ray.models.exit_files import heads_metadata
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository(models_file=tiny["models_file"])
    assert repo.exits_path("tiny-llama") == tiny["out"] / "exits.safetensors"
    assert heads_metadata(tiny["out"] / "exits.safetensors") == {
        2: {"kind": "linear", "rank": None}, 3: {"kind": "block"}, 4: {"kind": "healed", "layers": 2, "rank": 8}}
    full = load_model("tiny-llama", repo=repo, exits="shared", dtype="float32")
    ids = np.load(tiny["work"] / "eval_ids.npy")
    valid = np.load(tiny["work"] / "eval_valid.npy")
    for depth, kind in ((3, "block"), (4, "healed")):  # a healed exit: merged into layers 2-3 of the replica
        m = load_model("tiny-llama", depth=depth, repo=repo, dtype="float32")
        assert m.exit_head.kind == kind and m.depth == depth
        hits = total = 0
        for row, ok in zip(ids, valid):
            x = torch.tensor(row[ok], dtype=torch.long)[None]
            pos = torch.arange(x.shape[1])[None]
            a = m.forward_exit(x, pos, m.new_cache(), last_only=False).argmax(-1)
            b = full.forward_exit(x, pos, full.new_cache(), last_only=False).argmax(-1)
            hits += int((a == b).sum())
            total += x.shape[1]
        assert hits / total == pytest.approx(card["exits"][str(depth)]["agreement"], abs=2e-3)


def test_a_card_with_a_healed_exit_prices_it_free_and_never_offers_it_as_a_token_exit(card, tiny):
    from helios_ray.models.early_exit import load_model
    from helios_ray.tuning.profiling import candidate_info, inner_exits, token_exits_from_card
    from helios_ray.models.repository import ModelRepository

    repo = ModelRepository(models_file=tiny["models_file"])
    info = candidate_info(repo, "tiny-llama")
    assert info.free_exits == [4]
    # depth 4 (healed) costs what plain truncation costs; depth 3 pays the block head and its KV layer
    plain = info.model_copy(update={"exit_head_bytes": 0, "exit_kv_bytes_per_token": 0})
    assert info.footprint(4) == plain.footprint(4) and info.footprint(3) != plain.footprint(3)
    everything = token_exits_from_card(repo, "tiny-llama", 0.3, 0.0)  # trust every exit: only usability cuts
    assert everything == [2, 3]  # 4 is healed: a greedy exit only
    assert token_exits_from_card(repo, "tiny-llama", 0.3, 0.0, depth=4) == []  # 2, 3 lie inside the healed layers
    assert set(inner_exits(repo, "tiny-llama", 4, 0.3, 0.0)["considered"]) == set()
    # served quantized, the healed exit still merges (before quantizing) and changes the model
    healed = load_model("tiny-llama", depth=4, repo=repo, dtype="int8")
    shared = load_model("tiny-llama", depth=4, repo=repo, dtype="int8", exits="shared")
    assert healed.exit_head.kind == "healed" and healed.exit_head.merged and healed.footprint == shared.footprint
    assert any(not torch.equal(a, b) for a, b in zip(healed.lm.state_dict().values(), shared.lm.state_dict().values()))


def test_resume_reuses_finished_heads(card, tiny, capsys):
    rc = main(tiny["args"] + ["--resume"])
    out, err = capsys.readouterr()
    assert rc == 0 and "already trained" in err and "reusing the cache" in err
    again = json.loads(out)
    for d in ("2", "3"):
        assert again["exits"][d]["agreement"] == card["exits"][d]["agreement"]


def test_an_interrupted_head_resumes_to_the_same_weights(card, tiny):
    """Deterministic with a seed: 12 steps in one go == 5 steps, a checkpoint, then the other 7."""
    cfg = TuneConfig(model="tiny-llama", exits=[ExitSpec(3, "block")], data=str(tiny["data"]), tokens=5000,
                       seq_len=48, batch_tokens=192, eval_conversations=24, eval_seq_len=48, eval_stride=1,
                       work_dir=tiny["work"], models_file=str(tiny["models_file"]), progress=False, lr=3e-3)
    run = T.TuningRun(cfg)  # the cache of the module's run is reused, not rebuilt
    e = cfg.exits[0]

    def fresh():
        return build_head(e, run.lm, cfg.block_init, cfg.seed)

    ckpt = tiny["root"] / "interrupt.ckpt"
    a = fresh()
    train_head(a, run.lm, run.train_cache, 12, run.batch_rows, 3e-3, cfg, tiny["root"] / "none.ckpt", False)
    b = fresh()
    assert train_head(b, run.lm, run.train_cache, 12, run.batch_rows, 3e-3, cfg, ckpt, False, stop_after=5) is None
    assert ckpt.exists()
    c = fresh()  # a new process would start from scratch weights and pick up the checkpoint
    res = train_head(c, run.lm, run.train_cache, 12, run.batch_rows, 3e-3, cfg, ckpt, False)
    assert res is not None and res["steps"] == 12
    for k, v in a.state_dict().items():
        torch.testing.assert_close(c.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_eval_exits_on_a_prompt_file(card, tiny, capsys):
    prompts = tiny["root"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat sat on {w}", "kind": k}) + "\n"
                               for w, k in [("a mat", "text"), ("the river", "text"), ("two dogs", "story")]))
    rc = main(["eval-exits", "tiny-llama", "--prompts", str(prompts), "--max-tokens", "4", "--json", "--no-progress",
               "--humaneval", "2", "--humaneval-max-tokens", "6", "--pass-at-1-depths", "3", "--update-card",
               "--models-file", str(tiny["models_file"])])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["num_prompts"] == 3 and 3 <= rep["generated_tokens"] <= 12 and sorted(rep["exits"]) == ["2", "3", "4"]
    for e in rep["exits"].values():
        assert 0.0 <= e["agreement"] <= 1.0 and set(e["by_kind"]) == {"story", "text"}
        assert 0.0 <= e["free_run"]["exact_match"] <= e["free_run"]["common_prefix"] <= 1.0
    assert rep["exits"]["3"]["head"] == "block" and rep["exits"]["4"]["head"] == "healed"
    # task quality: pass@1 at the asked depth and at full depth (a tiny random model passes nothing)
    he = rep["humaneval"]
    assert he["problems"] == 2 and sorted(he["depths"], key=int) == ["3", "5"]
    for d in he["depths"].values():
        assert d["pass_at_1"] == 0.0 and d["problems"] == 2 and d["generated_tokens"] <= 12
        assert set(d["results"]) == {"HumanEval/0", "HumanEval/1"}
        assert all(v.startswith("failed") for v in d["results"].values())
    assert rep["exits"]["3"]["pass_at_1"] == 0.0 and "pass_at_1" not in rep["exits"]["2"]
    # --update-card: the card now carries pass@1, and the policy's prior the drop from full depth
    from helios_ray.tuning.profiling import candidate_info
    from helios_ray.models.repository import ModelRepository

    card_now = json.loads((tiny["out"] / "exits.json").read_text())
    assert card_now["humaneval"]["pass_at_1_full"] == 0.0 and card_now["humaneval"]["problems"] == 2
    assert card_now["exits"]["3"]["pass_at_1"] == 0.0 and "pass_at_1" not in card_now["exits"]["2"]
    info = candidate_info(ModelRepository(models_file=tiny["models_file"]), "tiny-llama")
    assert info.exit_prior[3].pass_at_1_drop == 0.0 and info.exit_prior[2].pass_at_1_drop is None
    # the drop is full minus exit (a tiny model passes nothing, so check the sign on a card that says more)
    card_path = tiny["out"] / "exits.json"
    saved = card_path.read_text()
    card_now["humaneval"]["pass_at_1_full"], card_now["exits"]["3"]["pass_at_1"] = 0.5, 0.25
    card_path.write_text(json.dumps(card_now))
    try:
        assert candidate_info(ModelRepository(models_file=tiny["models_file"]), "tiny-llama"
                              ).exit_prior[3].pass_at_1_drop == 0.25
    finally:
        card_path.write_text(saved)


@pytest.mark.parametrize("extra, message", [
    (["--exits", "5"], "exit layer 5 is out of range for tiny-llama: it has 5 layers"),
    (["--exits", "0"], "exit layer 0 is out of range"),
    (["--exits", "2:wide"], "unknown exit head kind 'wide'"),
    (["--exits", "x"], "is not a layer number"),
    (["--exits", "3:healed3"], "must be healed or healedK with 1 <= K < 3"),
    (["--exits", "3:healed", "--heal-rank", "0"], "--heal-rank must be >= 1"),
    (["--exits", "2", "--data", "EMPTY"], "has no records"),
    (["--exits", "2", "--data", "MISSING"], "does not exist"),
    (["--exits", "2", "--data", "BAD"], "not valid JSON"),
    (["--exits", "2", "--tokens", "0"], "--tokens must be >= 1"),
])
def test_bad_input_is_one_clear_line_and_code_2(tiny, capsys, extra, message):
    empty, bad = tiny["root"] / "empty.jsonl", tiny["root"] / "bad.jsonl"
    empty.write_text("\n")
    bad.write_text('{"text": "fine"}\n{nope\n')
    files = {"EMPTY": str(empty), "MISSING": str(tiny["root"] / "missing.jsonl"), "BAD": str(bad)}
    extra = [files.get(a, a) for a in extra]
    if "--data" not in extra:
        extra += ["--data", str(tiny["data"])]
    rc = main(["tune-exits", "tiny-llama", *extra, "--models-file", str(tiny["models_file"]),
               "--work-dir", str(tiny["root"] / "bad-work"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_model_is_code_2(capsys):
    for cmd in (["tune-exits", "no-such-model", "--exits", "2"], ["eval-exits", "no-such-model", "--prompts", "x"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "unknown model 'no-such-model'" in err and len(err.strip().splitlines()) == 1


def test_recommended_threshold_is_the_smallest_that_reaches_the_target():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 20000)
    agree = rng.uniform(0, 1, 20000) < conf  # P(agree) = confidence: calibrated by construction
    thr = recommend_threshold(agree, conf)
    assert thr in (0.9, 0.95)  # tokens above t agree (1 + t) / 2 of the time: >= 0.95 from t = 0.9 on
    cal = {r["threshold"]: r for r in calibration(agree, conf)}
    assert cal[0.5]["coverage"] == pytest.approx(0.5, abs=0.02)
    assert cal[0.5]["agreement"] == pytest.approx(0.75, abs=0.02)
    assert recommend_threshold(np.zeros(100, bool), np.ones(100)) is None
    assert recommend_threshold(np.ones(10, bool), np.ones(10)) is None  # too few tokens to trust


def test_parse_exits():
    assert parse_exits("24,16:linear, 20", "block") == [ExitSpec(16, "linear"), ExitSpec(20, "block"),
                                                        ExitSpec(24, "block")]
    assert parse_exits("8", "linear", rank=64) == [ExitSpec(8, "linear", 64)]
    assert parse_exits("22:healed,20:healed4", "block", heal_layers=2, heal_rank=16) == [
        ExitSpec(20, "healed", 16, 4), ExitSpec(22, "healed", 16, 2)]
    assert ExitSpec(20, "healed", 16, 4).input_depth == 16 and ExitSpec(20, "block").input_depth == 20
