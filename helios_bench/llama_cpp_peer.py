"""llama.cpp as the CPU peer in ``helios-ray bench engine``, run in a child process.

Why a child: ``llama-cpp-python`` is native code built on the user's machine (an optional extra), and a build
that uses instructions the host refuses (e.g. AMX tiles a VM has not enabled) dies of a signal, not an exception.
In a child that is a line in the report, not a lost benchmark.  Protocol: one JSON object on stdin
(``{"gguf", "requests": [[prompt ids, n], ...], "threads"}``), one on stdout (``{"seconds", "outputs"}`` or
``{"error"}``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any


def run(gguf: str, reqs: list[tuple[list[int], int]], threads: int, timeout: float = 1800.0) -> dict[str, Any]:
    """``{"seconds", "outputs"}`` of greedy generation (EOS ignored, one request at a time, after one warm-up
    request), or ``{"error": ...}`` when llama-cpp-python is missing, fails or crashes."""
    job = json.dumps({"gguf": gguf, "requests": [[list(p), n] for p, n in reqs], "threads": threads})
    try:
        r = subprocess.run([sys.executable, "-m", "helios_bench.llama_cpp_peer"], input=job, text=True,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if r.returncode < 0:
        return {"error": f"llama.cpp crashed (signal {-r.returncode}); rebuild llama-cpp-python for this CPU, e.g. "
                         "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF'"}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"llama.cpp child exited {r.returncode}: {r.stderr.strip()[-300:]}"}


def _main() -> None:
    job = json.loads(sys.stdin.read())
    try:
        from llama_cpp import Llama
    except ImportError:
        print(json.dumps({"error": "not installed (pip install 'helios-ray[llamacpp]': builds llama-cpp-python, "
                                   "~4 min here)"}))
        return
    llm = Llama(model_path=job["gguf"], n_ctx=2048, n_threads=job["threads"], n_threads_batch=job["threads"],
                n_batch=512, verbose=False, seed=0)

    def generate(prompt: list[int], n: int) -> list[int]:
        out: list[int] = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out

    reqs = job["requests"]
    generate(*reqs[0])  # warm-up (mmap, first-call overheads), as the other sides get
    t0 = time.perf_counter()
    outs = [generate(p, n) for p, n in reqs]
    print(json.dumps({"seconds": time.perf_counter() - t0, "outputs": outs}))


if __name__ == "__main__":
    _main()
