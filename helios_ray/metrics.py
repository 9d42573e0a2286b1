"""Prometheus metrics (through ``ray.serve.metrics``) and energy telemetry (NVML when a GPU is there).

Metric names follow vLLM's spirit; Ray exports them as ``ray_helios_<name>`` on the metrics port with
application/deployment/replica tags.  Energy is read from NVML's total-energy counter; without a GPU (or without
the NVIDIA library) it is simply "not available": ``EnergyMeter.joules()`` returns None and nothing crashes.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class RouterMetrics:
    """Per-request metrics, recorded by the ingress that relays every token."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.ttft = Histogram("helios_time_to_first_token_seconds", "Time to first token",
                              boundaries=_LATENCY_BOUNDS, tag_keys=("model",))
        self.tpot = Histogram("helios_time_per_output_token_seconds", "Mean time per output token after the first",
                              boundaries=_LATENCY_BOUNDS, tag_keys=("model",))
        self.e2e = Histogram("helios_e2e_request_latency_seconds", "End-to-end request latency",
                             boundaries=_LATENCY_BOUNDS, tag_keys=("model",))
        self.requests = Counter("helios_requests", "Finished requests", tag_keys=("model", "finish_reason"))
        self.errors = Counter("helios_request_errors", "Requests that failed", tag_keys=("status",))
        self.tokens = Counter("helios_generation_tokens", "Generated tokens", tag_keys=("model",))
        self.breaches = Counter("helios_confidence_breaches", "Tokens whose exit confidence was below the "
                                "threshold", tag_keys=("model",))
        self.exit_depth = Histogram("helios_exit_depth", "Layer at which tokens exit",
                                    boundaries=[float(b) for b in range(2, 65, 2)], tag_keys=("model",))


class ReplicaMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.running = Gauge("helios_num_requests_running", "Sequences in the running batch")
        self.waiting = Gauge("helios_num_requests_waiting", "Sequences queued for admission")
        self.kv_usage = Gauge("helios_kv_cache_usage_ratio", "Share of KV blocks in use")
        self.loaded_layers = Gauge("helios_loaded_layers", "Decoder layers loaded", tag_keys=("model",))
        self.switches = Counter("helios_placement_changes", "Depth changes and model switches applied",
                                tag_keys=("kind",))
        self.energy = Gauge("helios_energy_joules_per_token", "Energy per generated token (NVML)")


@lru_cache(maxsize=1)
def _nvml() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as e:  # NVMLError_LibraryNotFound on machines without a GPU, ImportError, ...
        log.info("NVML not available (%s): energy telemetry disabled", type(e).__name__)
        return None


class EnergyMeter:
    """Joules consumed by one GPU since an arbitrary origin, or None where that cannot be known."""

    def __init__(self, device_index: int = 0):
        self.nvml = _nvml()
        self.handle = None
        if self.nvml is not None:
            try:
                self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index)
            except Exception:
                self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def joules(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # mJ -> J
        except Exception:
            return None
