"""Typed messages between the deployments: the generation call, the replica's stream events, replica stats.

Routers, both replica kinds (engine and plain) and the brain exchange these objects - pickled by Ray, never
parsed by string - so a renamed or missing field fails where it is built, not in a router loop five calls
later.  They are internal: the public wire formats are the OpenAI schemas (:mod:`.protocol`) and helios.v1.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from helios_ray.engine.sequence import SamplingParams


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateCall(_Msg):
    """What the router sends a replica: exactly one of ``prompt`` / ``messages``, already validated."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams
    metadata: dict[str, str] | None = Field(default=None, description="the request's metadata object (operator "
                                            "request classes may match on it)")
    resume_ids: list[int] = Field(
        default_factory=list, description="Tokens already streamed to the client by a replica that died: the "
                                          "replica continues after them (they count towards max_tokens).")


# --------------------------------------------------------------------------------------- stream events
class StreamStart(_Msg):
    """First event: the request was admitted; which placement serves it."""

    type: Literal["start"] = "start"
    model: str
    depth: int
    prompt_tokens: int


class StreamToken(_Msg):
    type: Literal["token"] = "token"
    token: int
    text: str
    exit_layer: int
    confidence: float
    breach: bool


class StreamEnd(_Msg):
    type: Literal["end"] = "end"
    finish_reason: str
    completion_tokens: int
    error: str | None = Field(default=None, description="Set when the engine failed the request mid-way.")


class StreamError(_Msg):
    """The replica refused the request before starting it (bad input: 4xx; server state: 5xx)."""

    type: Literal["error"] = "error"
    status: int
    message: str
    retry_after_s: float | None = Field(default=None, description="Set for server states worth retrying (503).")


StreamEvent = Union[StreamStart, StreamToken, StreamEnd, StreamError]


# ------------------------------------------------------------------------------------------ replica stats
class ReplicaStats(BaseModel):
    """What every replica (engine or plain) reports to the brain every few seconds; shown in the status."""

    model_config = ConfigDict(extra="forbid")

    replica: str
    pid: int
    node_id: str = Field(default="", description="The Ray node it runs on.")
    group: str = Field(default="default", description="The replica group it belongs to.")
    mode: Literal["helios", "early_exit", "plain"]
    model: str
    depth: int
    total_layers: int
    exit_head: str
    token_exits: list[int] = Field(default_factory=list)
    placement_version: int | None = Field(
        default=None, description="The brain's placement version this replica runs; None = it follows none (plain).")
    running: int
    waiting: int
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    weight_bytes: int
    kv_bytes_per_token: int
    memory_budget_bytes: int
    max_concurrent_1k: int = Field(description="Sequences of 1024 tokens the memory budget holds at once.")
    tokens_out: int
    breaches: int = 0
    steps: int
    requests: int = 0
    last_batch: int = 0
    switches: int = 0
    last_change: dict[str, Any] | None = None
    energy_j_per_token: float | None = None
    reported_at: float | None = None

    @classmethod
    def here(cls, **fields: Any) -> "ReplicaStats":
        """Stats of the replica this runs in: its Serve replica id, process and Ray node filled in."""
        import os

        import ray
        from ray import serve

        return cls(replica=serve.get_replica_context().replica_id.unique_id, pid=os.getpid(),
                   node_id=ray.get_runtime_context().get_node_id(), **fields)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)
