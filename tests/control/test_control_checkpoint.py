"""A controller restored from its checkpoint is the same controller: same status, and from then on the same
decisions on the same traffic as the one that never stopped (what a restarted brain relies on)."""

from __future__ import annotations

from test_control_controller import ALPHA, BIG, chat_profile, drive

from helios_ray.control import CandidateInfo, Controller, PolicyConfig
from helios_ray.control.checkpoint import ControllerState, restore, snapshot

BETA = CandidateInfo(name="beta", num_layers=24, exits=[12, 16, 20], flops_per_token_per_layer=8,
                     head_flops_per_token=5)
CFG = PolicyConfig(profile_prompts=2, reassess_every=6, breach_window=20, breach_limit=10, hysteresis_requests=2)


def _fresh() -> Controller:
    return Controller([ALPHA, BETA], "throughput", BIG, CFG, clock=lambda: 1000.0)  # PHT ages are compared


def _history(ctl: Controller) -> list[tuple]:
    return [(d.action, d.model, d.depth, d.trigger) for d in ctl.decisions]


def test_restored_controller_continues_identically():
    ctl = _fresh()
    ctl.start()
    chat_profile(ctl, "alpha")
    chat_profile(ctl, "beta")
    drive(ctl, 9, confidence={20: 0.5, 16: 0.5, 12: 0.5})  # storms and re-assessments happen
    assert len(ctl.decisions) >= 2 and ctl.breaches.total_tokens > 0

    state = ControllerState.model_validate_json(snapshot(ctl).model_dump_json())  # through its wire form
    twin = _fresh()
    restore(twin, state)
    assert twin.status() == ctl.status()
    assert twin.breaches.window_state() == ctl.breaches.window_state()

    for c in (ctl, twin):  # the same traffic from here on
        drive(c, 8, confidence={20: 0.5, 24: 0.97})
    assert _history(twin) == _history(ctl)
    assert twin.status() == ctl.status()


def test_a_fresh_controller_differs_without_the_checkpoint():
    """The test above could pass vacuously if restore() were a no-op and the traffic alone decided; it is not."""
    ctl = _fresh()
    ctl.start()
    chat_profile(ctl, "alpha")
    drive(ctl, 9, confidence={20: 0.5, 16: 0.5, 12: 0.5})
    blank = _fresh()
    blank.start()
    assert blank.status() != ctl.status()
