"""The sandboxed HumanEval runner: model-free, each case a fresh child interpreter (~0.1 s)."""

from __future__ import annotations

import os
from pathlib import Path

from helios_ray.tuning.code_eval import STOP_SEQUENCES, check_program, humaneval_program, truncate_at_stop

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _run(completion: str, **kw):
    return check_program(humaneval_program(PROMPT, completion, TEST, "add"), **kw)


def test_a_correct_solution_passes():
    r = _run("    return a + b\n")
    assert r.passed and r.status == "passed", r


def test_a_wrong_solution_fails_with_the_assertion():
    r = _run("    return a - b\n")
    assert not r.passed and r.status == "failed"
    assert "AssertionError" in r.detail


def test_a_syntax_error_fails():
    r = _run("    return a +\n")
    assert not r.passed and "SyntaxError" in r.detail


def test_an_infinite_loop_is_killed_by_the_timeout():
    r = _run("    while True:\n        pass\n", timeout=1.5)
    assert not r.passed and r.status == "timeout"
    assert r.seconds < 6


def test_exiting_the_interpreter_early_is_not_a_pass():
    for body in ("    exit(0)\n", "    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
                 "    raise SystemExit\n"):
        r = _run(body)
        assert not r.passed and r.status == "failed", (body, r)
    # at module level too: the tests never run, so it cannot pass
    r = check_program("import sys\nsys.exit(0)\n")
    assert not r.passed


def test_writing_or_deleting_outside_the_temp_dir_is_refused(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "new.txt"
    for body in (f"    open({str(outside)!r}, 'w').write('x')\n    return a + b\n",
                 f"    import os\n    os.remove({str(victim)!r})\n    return a + b\n",
                 f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n    return a + b\n",
                 f"    import os\n    os.rename({str(victim)!r}, 'stolen.txt')\n    return a + b\n",
                 "    import os\n    os.system('touch /tmp/helios-should-not-exist')\n    return a + b\n",
                 "    import subprocess\n    subprocess.run(['true'])\n    return a + b\n"):
        r = _run(body)
        assert not r.passed and "PermissionError" in r.detail and "sandbox" in r.detail, (body, r)
    assert victim.read_text() == "keep me" and not outside.exists()
    assert not os.path.exists("/tmp/helios-should-not-exist")


def test_files_inside_the_temp_dir_are_allowed_and_removed_afterwards():
    r = _run("    import os\n    open('scratch.txt', 'w').write(os.getcwd())\n    return a + b\n")
    assert r.passed, r


def test_memory_is_limited():
    r = _run("    x = bytearray(4 << 30)\n    return a + b\n", memory_mb=512)
    assert not r.passed and "MemoryError" in r.detail


def test_completions_stop_at_the_humaneval_stop_sequences():
    text = "    return a + b\n\n\ndef main():\n    pass\n"
    assert truncate_at_stop(text) == "    return a + b\n\n"
    assert truncate_at_stop("    return 1\n# tests\nprint(1)") == "    return 1"
    assert truncate_at_stop("    x = 1\n    # a comment inside the body stays\n    return x") == (
        "    x = 1\n    # a comment inside the body stays\n    return x")
    assert "\nif __name__" in STOP_SEQUENCES
