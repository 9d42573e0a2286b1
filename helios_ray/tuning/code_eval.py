"""Functional correctness of generated code (HumanEval pass@1), run out of process.

A candidate program (``prompt + completion + test + check(entry_point)``) is never executed in the server or the
evaluating process: each one runs in a fresh ``sys.executable -I -B`` child, in its own temporary directory and
process session, with a wall-clock timeout (the whole process group is killed), and a small harness that first

* sets resource limits with ``resource.setrlimit`` (address space, CPU seconds, file size, no core files) - in
  the child itself rather than in a ``preexec_fn``, because the evaluating process runs torch threads and
  ``preexec_fn`` is not safe in a threaded parent;
* installs a Python audit hook (``sys.addaudithook``, which cannot be removed) that refuses writes, deletes,
  renames and directory changes outside the temporary directory, and new processes, signals, sockets and
  ``ctypes``;
* runs the program with ``exec`` and reports success only by printing a per-run nonce *after* ``check``
  returns, so a program that exits the interpreter early (``exit()``, ``sys.exit(0)``, ``os._exit(0)``) fails.

This guards against the accidents of model-written code (runaway loops, stray file writes, ``exit()``), not
against deliberately hostile code: an audit hook is not an OS sandbox.  For untrusted code run it in a container.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STOP_SEQUENCES", "ExecResult", "check_program", "humaneval_program", "truncate_at_stop"]

#: HumanEval's usual stop sequences: a completion ends where the next top-level statement would begin.
STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

_OUTPUT_CAP = 16_384  # bytes of the child's stdout/stderr read back

_HARNESS = r'''
import os, resource, sys
_nonce = os.environ.pop("HELIOS_EVAL_NONCE")
_mem, _cpu, _fsize = (int(v) for v in os.environ.pop("HELIOS_EVAL_LIMITS").split(","))
for _res, _v in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_FSIZE, _fsize),
                 (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(_res, (_v, _v))
    except (ValueError, OSError):
        pass
_root = os.path.realpath(os.getcwd())
_src = open(sys.argv[1], encoding="utf-8").read()
_stdout_write, _stdout_flush, _exit = sys.stdout.write, sys.stdout.flush, os._exit


def _inside(p):
    if isinstance(p, int) or p is None:
        return True  # an already open descriptor: it was checked when it was opened
    try:
        p = os.path.realpath(os.fsdecode(p))
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)


_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "os.chdir": 1, "os.chroot": 1, "shutil.rmtree": 1, "os.rename": 2, "os.symlink": 2,
                "os.link": 2, "shutil.move": 2, "shutil.copyfile": 2, "os.mkfifo": 1, "os.mknod": 1}
_BLOCKED = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
            "os.kill", "os.killpg", "os.setuid", "socket.connect", "socket.bind", "socket.sendto",
            "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.startfile", "pty.spawn", "resource.setrlimit",
            "sys.addaudithook", "sys.setprofile", "sys.settrace")


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _W)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: no writing outside the working directory ({path})")
    elif event in _PATH_EVENTS:
        if event == "shutil.move" or event == "shutil.copyfile":
            paths = args[:2]
        elif event in ("os.symlink", "os.link"):
            paths = args[1:2]
        else:
            paths = args[:_PATH_EVENTS[event]]
        if event == "os.chdir" or not all(_inside(p) for p in paths):
            raise PermissionError(f"sandbox: {event} refused ({args[:2]!r})")
    elif event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} refused")


sys.addaudithook(_hook)
try:
    exec(compile(_src, "program.py", "exec"), {"__name__": "__helios_eval__", "__builtins__": __builtins__})
except SystemExit as e:
    sys.stderr.write(f"program tried to exit the interpreter (SystemExit {e.code!r})\n")
    sys.stderr.flush()
    _exit(3)
except BaseException as e:
    sys.stderr.write(f"{type(e).__name__}: {e}"[:2000] + "\n")
    sys.stderr.flush()
    _exit(1)
_stdout_write("\n" + _nonce + "\n")
_stdout_flush()
_exit(0)
'''


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str = ""
    seconds: float = 0.0


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """``text`` up to the first stop sequence (HumanEval's completion boundary)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval executes: the prompt, the completion, the problem's tests, ``check(entry_point)``."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(_OUTPUT_CAP)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def check_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16) -> ExecResult:
    """Run ``program`` in a sandboxed child (see the module doc); passed iff it ran to the end without error."""
    t0 = time.monotonic()
    nonce = "HELIOS-EVAL-OK-" + secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="helios-code-eval-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(program, encoding="utf-8")
        (work / "harness.py").write_text(_HARNESS, encoding="utf-8")
        env = {
            "PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "HELIOS_EVAL_NONCE": nonce,
            "HELIOS_EVAL_LIMITS": f"{memory_mb << 20},{int(timeout) + 1},{max_file_mb << 20}",
        }
        with (work / "stdout").open("wb") as out, (work / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "harness.py", "program.py"], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, close_fds=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult(False, "timeout", f"timed out after {timeout:g} s", time.monotonic() - t0)
            finally:
                _kill_group(proc)  # anything the program left behind in its session
        stdout, stderr = _tail(work / "stdout"), _tail(work / "stderr")
    seconds = time.monotonic() - t0
    if rc == 0 and nonce in stdout.splitlines():
        return ExecResult(True, "passed", "", seconds)
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else (f"exit code {rc}" if rc != 0 else "the program ended before its tests ran")
    if rc < 0:
        detail = f"killed by signal {-rc} ({signal.Signals(-rc).name})" + (f": {detail}" if lines else "")
    return ExecResult(False, "failed", detail[:500], seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
