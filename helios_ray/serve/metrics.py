"""Prometheus metrics (through ``ray.serve.metrics``) and energy telemetry (NVML when a GPU is there).

Metric names follow vLLM's spirit; Ray exports them as ``ray_helios_<name>`` on the metrics port with
application/deployment/replica tags.  Energy is read from NVML's total-energy counter of the replica's own GPU,
matched by PCI bus id; without a GPU (or without the NVIDIA library) it is simply "not available":
``EnergyMeter.joules()`` returns None and nothing crashes.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class RouterMetrics:
    """Per-request metrics, recorded by the ingress that relays every token."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

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
        self.shed = Counter("helios_requests_shed", "Requests answered 503 + Retry-After by admission control "
                            "(queue_full: every replica and the router queue full; switching: a swap outlasted "
                            "the switch wait)", tag_keys=("reason",))
        self.resumed = Counter("helios_requests_resumed", "Streams resumed on a live replica after theirs died",
                               tag_keys=("model",))
        self.admission_limit = Gauge("helios_admission_limit", "Requests the cluster admits before shedding "
                                     "(replicas x (max_num_seqs + max_waiting_per_replica) + max_queued)")
        self.exit_depth = Histogram("helios_exit_depth", "Layer at which tokens exit",
                                    boundaries=[float(b) for b in range(2, 65, 2)], tag_keys=("model",))
        self.routed = Counter("helios_routed_requests", "Requests steered to a replica group (kind: the request's "
                              "class; reason: predicted, explore, capacity, only, or below_floor - no placement met "
                              "the class's quality floor, so the best-quality one served it)",
                              tag_keys=("group", "kind", "reason"))
        self.route_error = Histogram("helios_route_prediction_error", "|predicted - observed| breach rate of a "
                                     "request steered by a trusted prediction",
                                     boundaries=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0], tag_keys=("group",))
        self.group_depth = Gauge("helios_group_placement_depth", "Layers the group's placement loads, tagged with "
                                 "its model (moves when the policy or an operator moves the group)",
                                 tag_keys=("group", "model"))
        self.group_quality = Gauge("helios_group_placement_quality", "Measured quality of the group's placement per "
                                   "request class (code: HumanEval pass@1; chat: the score under the reference)",
                                   tag_keys=("group", "model", "class"))


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


# ------------------------------------------------------------------------------------ GPU <-> NVML matching
# NVML numbers GPUs its own way and ignores CUDA_VISIBLE_DEVICES: in a Ray replica that was given the third GPU,
# torch's cuda:0 is NVML's device 2.  The PCI address is the one name both agree on, so the replica's GPU is
# found in NVML by its bus id.  NVML writes it "00000000:3B:00.0" (8-digit domain, upper case; a legacy form has
# 4 digits), sysfs and torch-derived strings "0000:3b:00.0": compare normalised addresses, never raw strings.
_BUS_ID_RE = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def normalize_bus_id(bus_id: str | bytes) -> str:
    """``domain:bus:device.function`` in one spelling: lower case, 4-digit (or wider) domain, 2-digit bus and
    device, domain 0 when omitted.  ``00000000:3B:00.0``, ``0000:3b:00.0`` and ``3b:00.0`` all give
    ``0000:3b:00.0``.  Raises ValueError for anything else."""
    text = bus_id.decode("ascii", "replace") if isinstance(bus_id, (bytes, bytearray)) else str(bus_id)
    m = _BUS_ID_RE.match(text.strip(" \t\r\n\x00"))
    if m is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, dev, fn = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"


def nvml_bus_id(domain: int, bus: int, device: int) -> str:
    """The address in NVML's own format (``NVML_DEVICE_PCI_BUS_ID_FMT``), e.g. ``00000000:3B:00.0``."""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def cuda_bus_id(device: Any = None) -> str | None:
    """PCI bus id (NVML format) of a CUDA device: ``device`` is a torch device, ``"cuda:N"`` or an index into
    the devices this process sees (CUDA_VISIBLE_DEVICES applied); None means the current CUDA device.  None when
    there is no CUDA device, ``device`` is not one, or torch does not report PCI ids."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        if device is None:
            index = torch.cuda.current_device()
        elif isinstance(device, int):
            index = device
        else:
            dev = torch.device(device)
            if dev.type != "cuda":
                return None
            index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        # cudaDeviceProp.pciDomainID / pciBusID / pciDeviceID (torch exposes them since 2.6; torch.numa uses them)
        return nvml_bus_id(int(props.pci_domain_id), int(props.pci_bus_id), int(props.pci_device_id))
    except Exception as e:  # an old torch without the attributes, a broken driver, a bad device string, ...
        log.info("no PCI bus id for CUDA device %r (%s): energy telemetry disabled", device, e)
        return None


def _handle_bus_id(nvml: Any, handle: Any) -> str | None:
    try:
        info = nvml.nvmlDeviceGetPciInfo(handle)
    except Exception:
        return None
    for field in ("busId", "busIdLegacy"):
        try:
            return normalize_bus_id(getattr(info, field))
        except (AttributeError, ValueError):
            continue
    try:
        return normalize_bus_id(nvml_bus_id(info.domain, info.bus, info.device))
    except Exception:
        return None


def nvml_handle_for_bus_id(nvml: Any, bus_id: str | bytes) -> Any | None:
    """The NVML device handle of the GPU at ``bus_id`` (any spelling), or None if NVML has no such GPU.

    ``nvml`` is an initialised ``pynvml`` module (or an object with the same functions).  NVML's own lookup
    (``nvmlDeviceGetHandleByPciBusId``) is tried first and its answer checked against the device's PCI info;
    failing that, every NVML device is compared by normalised bus id.  Never raises."""
    try:
        want = normalize_bus_id(bus_id)
    except ValueError:
        log.warning("energy telemetry: %r is not a PCI bus id", bus_id)
        return None
    domain, rest = want.split(":", 1)
    try:
        handle = nvml.nvmlDeviceGetHandleByPciBusId(f"{int(domain, 16):08X}:{rest.upper()}")
        if _handle_bus_id(nvml, handle) in (want, None):  # None: PCI info unreadable, trust NVML's lookup
            return handle
    except Exception:
        pass
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception:
        return None
    for i in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
        except Exception:
            continue
        if _handle_bus_id(nvml, handle) == want:
            return handle
    log.warning("energy telemetry: NVML has no GPU at PCI %s", want)
    return None


class EnergyMeter:
    """Joules consumed by the GPU a replica runs on since an arbitrary origin, or None where that cannot be known.

    ``device``: the torch device the replica computes on (``"cuda:1"``, a ``torch.device``, an index); default the
    current CUDA device.  The GPU is found in NVML by PCI bus id, not by index (NVML ignores
    CUDA_VISIBLE_DEVICES).  Without a CUDA device, without NVML, or if the GPU cannot be matched, the meter is
    simply unavailable: ``available`` is False and ``joules()`` returns None; nothing raises.  ``nvml`` and
    ``bus_id`` replace the ``pynvml`` module and the device's bus id (tests).
    """

    def __init__(self, device: Any = None, *, nvml: Any = None, bus_id: str | None = None):
        self.bus_id = bus_id if bus_id is not None else cuda_bus_id(device)
        self.nvml = None
        self.handle = None
        if self.bus_id is None:
            return
        self.nvml = nvml if nvml is not None else _nvml()
        if self.nvml is not None:
            self.handle = nvml_handle_for_bus_id(self.nvml, self.bus_id)

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
