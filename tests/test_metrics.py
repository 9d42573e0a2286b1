"""Energy telemetry: the replica's own GPU is found in NVML by PCI bus id, and everything degrades to "not
available" without a GPU instead of crashing.

This machine has no GPU and no NVML library, so the matching logic is exercised against a small fake NVML module
(``FakeNVML``, the few ``pynvml`` functions the meter calls, same names and shapes: handles, a PCI info struct
whose ``busId`` is bytes in NVML's ``%08X:%02X:%02X.0`` format, energy in millijoules).  A fake is used only
because no GPU exists here; on a GPU machine ``test_energy_meter_on_this_machine`` checks the real NVML counter
of the real device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helios_ray.serve import metrics
from helios_ray.serve.metrics import EnergyMeter, cuda_bus_id, normalize_bus_id, nvml_handle_for_bus_id


class NVMLError(Exception):
    pass


class FakeNVML:
    """NVML's view of a machine: GPUs in NVML's own order, each with a PCI address and an energy counter."""

    def __init__(self, gpus: list[tuple[int, int, int, int]], by_bus_id: bool = True):
        # (domain, bus, device, millijoules) per GPU, in NVML index order
        self.gpus = [SimpleNamespace(index=i, domain=d, bus=b, device=dv, mj=mj) for i, (d, b, dv, mj) in
                     enumerate(gpus)]
        self.by_bus_id = by_bus_id
        self.lookups: list[str] = []

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int):
        if not 0 <= i < len(self.gpus):
            raise NVMLError("NVML_ERROR_INVALID_ARGUMENT")
        return self.gpus[i]

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str):
        """Strict like the driver is about the shape: ``domain:bus:device.function``, hex."""
        self.lookups.append(bus_id)
        if not self.by_bus_id:
            raise NVMLError("NVML_ERROR_FUNCTION_NOT_FOUND")  # an old driver without the _v2 entry point
        for g in self.gpus:
            if bus_id.upper() in (f"{g.domain:08X}:{g.bus:02X}:{g.device:02X}.0",
                                  f"{g.domain:04X}:{g.bus:02X}:{g.device:02X}.0"):
                return g
        raise NVMLError("NVML_ERROR_NOT_FOUND")

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=f"{handle.domain:08X}:{handle.bus:02X}:{handle.device:02X}.0".encode(),
                               domain=handle.domain, bus=handle.bus, device=handle.device)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:
        return handle.mj


# Four GPUs; NVML's index 2 sits at 0000:3b:00.0.  A replica pinned to that GPU sees it as cuda:0.
MACHINE = [(0, 0x1A, 0, 1_000), (0, 0x1B, 0, 2_000), (0, 0x3B, 0, 3_000), (1, 0x3B, 0, 4_000)]


@pytest.mark.parametrize("spelling", ["00000000:3B:00.0", "0000:3b:00.0", "0000:3B:00.0", "3b:00.0",
                                      b"00000000:3B:00.0\x00", " 00000000:3b:00.0\n"])
def test_bus_id_spellings_normalise_to_one_address(spelling):
    assert normalize_bus_id(spelling) == "0000:3b:00.0"


def test_bus_id_normalisation_keeps_what_distinguishes_gpus():
    assert normalize_bus_id("00000001:3B:00.0") == "0001:3b:00.0" != normalize_bus_id("0000:3b:00.0")
    assert normalize_bus_id("0000:3b:01.0") != normalize_bus_id("0000:3b:00.0")
    assert normalize_bus_id("0000:3b:00.1") != normalize_bus_id("0000:3b:00.0")
    assert normalize_bus_id("00010000:01:00.0") == "10000:01:00.0"  # VMD domains are wider than 4 digits


@pytest.mark.parametrize("bad", ["", "GPU-1234", "0000:3b:00", "0000:3g:00.0", "0000:3b:00.8", "3b"])
def test_malformed_bus_ids_are_rejected(bad):
    with pytest.raises(ValueError):
        normalize_bus_id(bad)


@pytest.mark.parametrize("spelling", ["0000:3b:00.0", "00000000:3B:00.0", "3b:00.0"])
def test_handle_is_picked_by_bus_id_not_by_index(spelling):
    nvml = FakeNVML(MACHINE)
    handle = nvml_handle_for_bus_id(nvml, spelling)
    assert handle is nvml.gpus[2]  # not NVML device 0, which an index-based meter would read
    assert nvml.lookups and all(b == "00000000:3B:00.0" for b in nvml.lookups), "NVML is asked in its own format"


def test_handle_found_by_scanning_when_nvml_cannot_look_up_bus_ids():
    nvml = FakeNVML(MACHINE, by_bus_id=False)
    assert nvml_handle_for_bus_id(nvml, "0001:3b:00.0") is nvml.gpus[3]  # same bus, other domain
    assert nvml_handle_for_bus_id(nvml, "0000:1b:00.0") is nvml.gpus[1]


def test_unknown_or_malformed_bus_id_gives_no_handle():
    for by_bus_id in (True, False):
        nvml = FakeNVML(MACHINE, by_bus_id=by_bus_id)
        assert nvml_handle_for_bus_id(nvml, "0000:99:00.0") is None
        assert nvml_handle_for_bus_id(nvml, "not a bus id") is None


def test_meter_reads_the_matched_gpus_counter():
    nvml = FakeNVML(MACHINE)
    meter = EnergyMeter(nvml=nvml, bus_id="0000:3b:00.0")
    assert meter.available and meter.joules() == 3.0  # 3000 mJ of NVML device 2
    nvml.gpus[2].mj = 3_500
    assert meter.joules() == 3.5


def test_meter_without_a_match_or_counter_is_unavailable_not_fatal():
    meter = EnergyMeter(nvml=FakeNVML(MACHINE), bus_id="0000:99:00.0")
    assert not meter.available and meter.joules() is None

    class NoCounter(FakeNVML):
        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            raise NVMLError("NVML_ERROR_NOT_SUPPORTED")

    meter = EnergyMeter(nvml=NoCounter(MACHINE), bus_id="0000:3b:00.0")
    assert meter.available and meter.joules() is None


def test_cuda_bus_id_from_torch_device_properties(monkeypatch):
    """torch reports cudaDeviceProp's pciDomainID / pciBusID / pciDeviceID as ints; they become NVML's format,
    for the device asked for (an index among the visible devices), or the current one by default."""
    props = {0: SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0),
             1: SimpleNamespace(pci_domain_id=1, pci_bus_id=0x1A, pci_device_id=2)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    assert cuda_bus_id() == "00000001:1A:02.0"
    assert cuda_bus_id("cuda") == "00000001:1A:02.0"
    assert cuda_bus_id("cuda:0") == cuda_bus_id(torch.device("cuda", 0)) == cuda_bus_id(0) == "00000000:3B:00.0"
    assert cuda_bus_id("cpu") is None
    assert cuda_bus_id("cuda:7") is None  # no such device: not available, no exception
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace())  # torch without pci ids
    assert cuda_bus_id() is None

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(metrics, "_nvml", lambda: FakeNVML(MACHINE))
    assert EnergyMeter("cuda:0").joules() == 3.0  # the end to end path with no arguments but the device
    assert EnergyMeter("cuda:1").joules() is None  # 0001:1a:02.0 is not on this fake machine


def test_energy_meter_on_this_machine():
    meter = EnergyMeter()  # what the replica does
    if torch.cuda.is_available():  # on a GPU machine NVML must give a monotone counter for this process's GPU
        a = meter.joules()
        assert meter.bus_id is not None and meter.available and a is not None and meter.joules() >= a
    else:
        assert cuda_bus_id() is None
        assert not meter.available and meter.joules() is None
