"""The engine's knobs: one schema for the library, the CLI benches and the serving YAML (``engine:``).

Pure pydantic (no torch), so :class:`~helios_ray.serve.config.ServeConfig` can embed it and a config file can be
validated without loading the engine.  Defaults are the serving defaults: what ``serve run
deployments/helios.yaml`` gets when the file says nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory_budget: ByteSize | None = Field(
        default=ByteSize(2 << 30),
        description="Weights + KV for one replica: bytes, or a size string such as '1GiB' or '512MiB'.  "
                    "Required on CPU; None on CUDA = gpu_memory_fraction of the free device memory.",
    )
    gpu_memory_fraction: float = Field(default=0.85, gt=0.0, le=1.0,
                                       description="CUDA only, when memory_budget is None.")
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per paged KV block.")
    max_num_seqs: int = Field(default=32, ge=1, description="Sequences decoding at once (the batch cap).")
    max_num_batched_tokens: int = Field(
        default=128, ge=16,
        description="Tokens one step runs (decode tokens + prompt chunks).  Small chunks keep inter-token latency "
                    "low while prompts arrive (SmolLM2 on 1 CPU thread, Poisson arrivals of 100-512-token "
                    "prompts: ITL p99 1.52 s -> 0.46 s at 128, TTFT p50 0.97 -> 1.18 s; `helios-ray bench mixed`).")
    chunked_prefill: bool = Field(
        default=True,
        description="Mixed steps: the decode tokens of running sequences plus prompt chunks (up to "
                    "max_num_batched_tokens tokens in all) in one packed forward, so a new prompt never stalls "
                    "decoding.  False = the older prefill-first steps, one forward per prompt (kept to measure "
                    "against).  Token-level exit models always use the older steps.",
    )
    decode_attention: Literal["auto", "paged", "gather"] = Field(
        default="auto",
        description="How decode tokens attend over the paged KV.  'paged': a CPU kernel that reads each "
                    "sequence's blocks in place (helios_ray/engine/csrc/paged_attention.c, built on first use with "
                    "the host's C compiler); 'gather': copy each sequence's blocks into a dense tensor per layer "
                    "and run SDPA (CUDA, and the reference to measure against); 'auto': the kernel on CPU when it "
                    "builds, else gather (logged).  Applies to every one-token step (packed decode groups, prefill-first "
                    "steps, token-level exit models); prompt chunks always gather.")
    prefault_kv: bool = Field(
        default=False,
        description="Zero-fill each layer's KV pool when it is allocated (at the first step after a start or a "
                    "depth change), so the whole budget is resident from then on: RSS stays flat instead of creeping "
                    "up as blocks are first written (which reads like a leak on a dashboard), and a host that "
                    "cannot hold the budget shows it at the first request, not hours later.  Off: pages become "
                    "resident as tokens are written (tests, laptops).")
    max_model_len: int | None = Field(default=2048, ge=2,
                                      description="Prompt + output cap; None = the model's context (max 8192).")
    torch_threads: int | None = Field(
        default=1, ge=1,
        description="Intra-op threads for this process; None = torch's default.  On small CPU hosts 1 is the "
                    "robust choice: with 2 OpenMP threads, any other busy process makes small matmuls stall "
                    "(measured 0.07 -> 6 ms).",
    )

    @property
    def memory_budget_bytes(self) -> int | None:
        return int(self.memory_budget) if self.memory_budget is not None else None
