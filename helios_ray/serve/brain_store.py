"""Where the brain keeps its checkpoint: Ray's internal key-value store (the GCS), one key per application.

The GCS outlives any actor, so a brain that Serve restarts - on this node or another - finds the state its
predecessor wrote; a file under the cache dir would not follow it across nodes.  The checkpoint carries a
fingerprint of the application's config: a redeployed application with a different config starts fresh
instead of inheriting a policy state built for other candidates or knobs.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from helios_ray.serve.brain_group import GroupCheckpoint

log = logging.getLogger("ray.serve")
NAMESPACE = "helios"


class BrainState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    groups: dict[str, GroupCheckpoint]
    sizes: dict[str, int] = Field(default_factory=dict, description="The fleet plan's replicas per group.")
    changes: list[dict[str, Any]] = Field(default_factory=list)
    requests: int = 0
    tokens_observed: int = 0
    profile_records: int = 0
    restarts: int = 0


def fingerprint(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def _key(app: str) -> bytes:
    return f"brain/{app}".encode()


def load(app: str, expected_fingerprint: str) -> BrainState | None:
    """The last checkpoint of ``app``'s brain, or None (none yet, another config, or no Ray KV here)."""
    try:
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return None
        raw = internal_kv._internal_kv_get(_key(app), namespace=NAMESPACE)
    except Exception:
        log.warning("helios brain: could not read its checkpoint", exc_info=True)
        return None
    if raw is None:
        return None
    try:
        state = BrainState.model_validate_json(raw)
    except Exception:
        log.warning("helios brain: ignoring an unreadable checkpoint", exc_info=True)
        return None
    return state if state.fingerprint == expected_fingerprint else None


def save(app: str, state: BrainState) -> bool:
    try:
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return False
        internal_kv._internal_kv_put(_key(app), state.model_dump_json().encode(), overwrite=True,
                                     namespace=NAMESPACE)
        return True
    except Exception:
        log.warning("helios brain: could not write its checkpoint", exc_info=True)
        return False
