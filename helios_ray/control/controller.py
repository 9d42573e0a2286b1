"""The stateful control loop that the router (live) and the simulator (replay) both drive.

It owns the PHT, the breach counter and the current placement, and turns the pure policy functions
into a sequence of :class:`~helios_ray.control.decision.Decision` records:

* ``start()`` -- first deployment from static metadata / exit-card priors (or a persisted PHT), so
  a cold cluster can serve at once.
* profiling windows -- the first ``profile_prompts`` requests, and the ``profile_prompts`` requests
  just before every multiple of ``reassess_every``, are mirrored to the shortlisted candidates
  (``begin_request()`` says to which); their profile-mode telemetry replaces the candidates' PHT
  profile entries, so the profile describes the recent workload.
* planning -- after the first window (trigger ``profile``) and exactly every ``reassess_every``
  completed requests (``reassess``), and immediately on ``set_slo``/``set_hardware``.
* storms -- every served token at the current placement feeds the breach counter; a storm calls
  :func:`~helios_ray.control.storm.on_storm`.

Anti-oscillation: every placement change after the first deployment opens a quiet period of
``hysteresis_requests`` completed requests in which neither storms nor periodic re-assessments may
change the placement again (storms are not even answered with ``keep``; they are counted as
suppressed); the breach counter is reset on every storm decision and every change, because old
confidences describe another placement; and a periodic re-assessment only moves a placement whose
guard still holds when the new one scores ``reassess_margin`` better. SLO and hardware changes are
operator intent and act at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from .config import SLO, CandidateInfo, Hardware, PolicyConfig
from .breach import BreachCounter
from .costs import cost_unit
from .decision import Action, Decision, DepthChoice, Estimate, NoFeasiblePlacement, Trigger
from .depth import evaluate_depth, profile_entry
from .pht import PHT
from .policy import choose, estimate_numbers, score_placements, shortlist
from .quality import QualityGate
from .storm import CostModel, on_storm
from .trace import TraceRequest, TraceToken

__all__ = ["Placement", "Controller"]


class Placement(BaseModel):
    """What the replicas should run: a model loaded to ``depth`` layers, batch sized from memory."""

    model: str
    depth: int
    batch_size: int | None = None


class Controller:
    """HELIOS control loop over a fixed candidate pool (see the module docstring)."""

    def __init__(
        self,
        candidates: Sequence[CandidateInfo],
        slo: SLO | str,
        hardware: Hardware,
        config: PolicyConfig | None = None,
        *,
        cost_model: CostModel | None = None,
        pht: PHT | None = None,
        clock: Callable[[], float] | None = None,
        quality: QualityGate | None = None,
    ) -> None:
        if not candidates:
            raise ValueError("the controller needs at least one candidate")
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        self.config = config or PolicyConfig()
        self.candidates: dict[str, CandidateInfo] = {c.name: c for c in candidates}
        self.slo = SLO(slo)
        self.hardware = hardware
        self.cost_model = cost_model or CostModel()
        self.pht = pht if pht is not None else PHT.from_config(self.config, clock)
        if pht is not None and clock is not None:
            self.pht.set_clock(clock)
        self.breaches = BreachCounter.from_config(self.config)
        self.current: Placement | None = None
        self.shortlisted: list[str] = []
        self.decisions: list[Decision] = []
        self.tokens_served = 0
        self.requests_started = 0
        self.requests_done = 0
        self.suppressed_storm_tokens = 0
        self._quiet_until: int | None = None
        self._planned = False
        self._profile_targets: list[str] = []
        #: The quality floors every decision must meet for the traffic this placement serves (None: no floors).
        #: The owner updates it as the traffic's mix of request classes changes (:meth:`set_quality`).
        self.quality = quality

    # ------------------------------------------------------------------ helpers
    def _refresh_shortlist(self) -> list[str]:
        chosen = shortlist(
            list(self.candidates.values()), self.slo, self.hardware, self.pht, self.config, gate=self.quality
        )
        self.shortlisted = [c.name for c in chosen]
        return self.shortlisted

    def _pool(self) -> list[CandidateInfo]:
        names = list(self.shortlisted) or list(self.candidates)
        if self.current is not None and self.current.model not in names:
            names.append(self.current.model)
        return [self.candidates[n] for n in names]

    def in_quiet_period(self) -> bool:
        return self._quiet_until is not None and self.requests_done < self._quiet_until

    def _stamp(
        self, decision: Decision, trigger: Trigger, request: int | None, pos: int | None
    ) -> Decision:
        return decision.model_copy(
            update={
                "trigger": trigger,
                "slo": self.slo,
                "token_index": self.tokens_served,
                "request_index": self.requests_done,
                "request": request,
                "pos": pos,
            }
        )

    def _apply(self, decision: Decision) -> Decision:
        """Record a decision and move the placement; open the quiet period after a change."""
        changed = self.current is None or (decision.model, decision.depth) != (
            self.current.model,
            self.current.depth,
        )
        if decision.action != "keep" and decision.model is not None and decision.depth is not None:
            first = self.current is None
            self.current = Placement(
                model=decision.model, depth=decision.depth, batch_size=decision.batch_size
            )
            if changed:
                self.breaches.reset()
                if not first:
                    self._quiet_until = self.requests_done + self.config.hysteresis_requests
        self.decisions.append(decision)
        return decision

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Decision:
        """First deployment, before any profiling (priors or a persisted PHT decide)."""
        if self.current is not None:
            raise RuntimeError("controller already started")
        self._refresh_shortlist()
        decision = choose(self._pool(), self.slo, self.hardware, self.pht, self.config, gate=self.quality)
        decision = decision.model_copy(
            update={"reason": f"initial deployment before profiling; {decision.reason}"}
        )
        return self._apply(self._stamp(decision, "start", None, None))

    def profiling_window(self, n: int) -> bool:
        """Whether the n-th started request (1-based) is mirrored to the candidates."""
        p, every = self.config.profile_prompts, self.config.reassess_every
        if n <= p:
            return True
        k = -(-n // every)  # ceil: the re-assessment this request leads up to
        return n > k * every - p

    def begin_request(self) -> list[str]:
        """Call when a request is admitted: the models to mirror it to (empty when not profiling).

        The first request of a profiling window refreshes the shortlist and drops the targets' old
        profile entries, so the next plan sees only this window's telemetry.
        """
        self.requests_started += 1
        n = self.requests_started
        if not self.profiling_window(n):
            return []
        p, every = self.config.profile_prompts, self.config.reassess_every
        if n == 1 or (n > p and (n - 1) % every == every - p):
            self._refresh_shortlist()
            targets = list(self.shortlisted)
            if self.current is not None and self.current.model not in targets:
                targets.append(self.current.model)
            for name in targets:
                for entry in self.pht.for_model(name, include_stale=True):
                    if entry.exits:  # profile entries; serving timings stay
                        self.pht.reset(name, entry.depth)
            self._profile_targets = targets
        return list(self._profile_targets)

    # ------------------------------------------------------------------ telemetry in
    def observe_profile_token(self, record: TraceToken) -> None:
        """Profile-mode telemetry (a fully loaded model evaluating every exit) for one token."""
        cand = self.candidates.get(record.model)
        if cand is not None:
            self.pht.observe_token(record, depth=cand.num_layers)

    def observe_profile_request(self, record: TraceRequest) -> None:
        """Profile-mode timings of one request (full depth unless ``record.depth`` says else)."""
        cand = self.candidates.get(record.model)
        if cand is not None:
            self.pht.observe_request(record, depth=record.depth or cand.num_layers)

    def observe_token(
        self,
        model: str,
        depth: int,
        confidence: float,
        *,
        request: int | None = None,
        pos: int | None = None,
    ) -> Decision | None:
        """One token served by a replica; returns a decision when it set off a storm response.

        Tokens from another placement (in-flight streams that started before a change) are ignored:
        they say nothing about the current one.
        """
        if self.current is None or (model, depth) != (self.current.model, self.current.depth):
            return None
        self.tokens_served += 1
        self.breaches.record(confidence)
        if not self.breaches.storm:
            return None
        if self.in_quiet_period():
            self.suppressed_storm_tokens += 1
            return None
        decision = on_storm(
            self.current.model,
            self.current.depth,
            self._pool(),
            self.pht,
            self.cost_model,
            self.config,
            hardware=self.hardware,
            breach_rate=self.breaches.rate,
            gate=self.quality,
        )
        decision.numbers["breaches"] = self.breaches.breaches
        decision.numbers["window_tokens"] = self.breaches.tokens
        self.breaches.reset()
        # Even a "keep" opens the quiet period, so a persistent storm is answered once per
        # hysteresis period rather than once per token.
        self._quiet_until = self.requests_done + self.config.hysteresis_requests
        return self._apply(self._stamp(decision, "storm", request, pos))

    def observe_request(
        self,
        model: str,
        depth: int,
        *,
        output_tokens: int = 0,
        seconds: float | None = None,
        ttft_s: float | None = None,
        energy_j: float | None = None,
        prompt_tokens: int = 0,
        request: int | None = None,
    ) -> Decision | None:
        """A served request finished; returns a decision when it completes a planning point."""
        self.requests_done += 1
        if seconds is not None and model in self.candidates:
            self.pht.observe_request(
                TraceRequest(
                    model=model,
                    request=request if request is not None else self.requests_done,
                    prompt_tokens=prompt_tokens,
                    output_tokens=output_tokens,
                    seconds=seconds,
                    ttft_s=ttft_s,
                    energy_j=energy_j,
                    depth=depth,
                ),
                depth=depth,
            )
        n = self.requests_done
        if not self._planned and n >= self.config.profile_prompts:
            self._planned = True
            return self._replan("profile", request=request)
        if n % self.config.reassess_every == 0:
            return self._replan("reassess", request=request)
        return None

    # ------------------------------------------------------------------ planning
    def set_slo(self, slo: SLO | str) -> Decision:
        self.slo = SLO(slo)
        self._refresh_shortlist()
        return self._replan("slo_change")

    def set_hardware(self, hardware: Hardware) -> Decision:
        self.hardware = hardware
        self._refresh_shortlist()
        return self._replan("hardware_change")

    def set_quality(self, gate: QualityGate | None) -> None:
        """New floors or a new traffic mix; takes effect at the next decision (a re-plan when the current
        placement no longer meets them is the owner's call: :meth:`quality_breached`)."""
        self.quality = gate

    def quality_verdict(self) -> Any:
        """Whether the current placement meets the quality gate (None without a gate or a placement)."""
        if self.quality is None or self.current is None:
            return None
        return self.quality.check(self.candidates[self.current.model], self.current.depth)

    def quality_breached(self, request: int | None = None) -> Decision | None:
        """Re-plan now if the current placement misses its floors (the traffic's mix moved, or a measured score
        fell) - answered like a breach storm, hysteresis included; None when it meets them or is quiet."""
        verdict = self.quality_verdict()
        if verdict is None or verdict.ok or self.in_quiet_period():
            return None
        decision = self._replan("quality", request=request)
        if decision.action != "keep":
            self._quiet_until = self.requests_done + self.config.hysteresis_requests
        return decision

    def reassess(self) -> Decision:
        """Re-plan now as a periodic re-assessment would (hysteresis and margin apply)."""
        return self._replan("reassess")

    def _replan(self, trigger: Trigger, *, request: int | None = None) -> Decision:
        previous = self.current
        prev_model = previous.model if previous else None
        prev_depth = previous.depth if previous else None
        try:
            best = choose(self._pool(), self.slo, self.hardware, self.pht, self.config, gate=self.quality)
        except NoFeasiblePlacement as exc:
            decision = Decision(
                action="keep",
                model=prev_model,
                depth=prev_depth,
                reason=f"no feasible placement, keeping the current one: {exc}",
            )
            return self._apply(
                self._stamp(
                    decision.model_copy(
                        update={"previous_model": prev_model, "previous_depth": prev_depth}
                    ),
                    trigger,
                    request,
                    None,
                )
            )
        update: dict[str, Any] = {"previous_model": prev_model, "previous_depth": prev_depth}
        action: Action
        if previous is None:
            action = "deploy"
        elif (best.model, best.depth) == (previous.model, previous.depth):
            action = "keep"
            update["reason"] = f"current placement is still the best; {best.reason}"
        else:
            blocked = self._blocked(trigger, best)
            if blocked is not None:
                action = "keep"
                update.update(
                    model=previous.model,
                    depth=previous.depth,
                    batch_size=previous.batch_size,
                    reason=blocked,
                )
                update["numbers"] = {
                    **best.numbers,
                    "proposed": f"{best.model}@{best.depth}",
                }
            elif best.model != previous.model:
                action = "switch"
            elif best.depth > previous.depth:
                action = "extend"
            else:
                action = "deploy"
        update["action"] = action
        return self._apply(self._stamp(best.model_copy(update=update), trigger, request, None))

    def _blocked(self, trigger: Trigger, best: Decision) -> str | None:
        """Why a periodic re-assessment must not move the placement now (None: it may)."""
        if trigger != "reassess":
            return None
        assert self.current is not None
        proposal = f"{best.model}@{best.depth}"
        if self.in_quiet_period():
            assert self._quiet_until is not None
            return (
                f"hysteresis: {proposal} scores better but the placement changed less than "
                f"{self.config.hysteresis_requests} requests ago (quiet until request "
                f"{self._quiet_until})"
            )
        cand = self.candidates[self.current.model]
        entry = profile_entry(self.pht, cand).entry
        here = evaluate_depth(cand, entry, self.config, self.current.depth)
        if not here.guard_ok:
            return None  # the current placement is no longer safe: move regardless of margin
        best_cand = self.candidates[best.model]
        best_entry = profile_entry(self.pht, best_cand).entry
        there = evaluate_depth(best_cand, best_entry, self.config, int(best.depth or 0))
        current_est, best_est = self._score_pair(cand, here, best_cand, there)
        if current_est is None or best_est is None:
            return None
        if current_est.score == best_est.score:
            gain = 0.0
        elif current_est.score in (0.0, float("-inf")):
            gain = float("inf")
        else:
            gain = (best_est.score - current_est.score) / abs(current_est.score)
        if gain < self.config.reassess_margin:
            return (
                f"margin: {proposal} is only {gain:+.1%} better than the current "
                f"{self.current.model}@{self.current.depth} (< reassess_margin "
                f"{self.config.reassess_margin:.0%})"
            )
        return None

    def _score_pair(
        self,
        cand: CandidateInfo,
        here: DepthChoice,
        best_cand: CandidateInfo,
        there: DepthChoice,
    ) -> tuple[Estimate | None, Estimate | None]:
        estimates = score_placements(
            [(cand, here), (best_cand, there)],
            self.slo,
            self.hardware,
            self.pht,
            self.config,
            unit=cost_unit(self._pool()),
        )
        by_key = {(e.model, e.depth): e for e in estimates}
        return by_key.get((cand.name, here.depth)), by_key.get((best_cand.name, there.depth))

    def placement_tokens_per_s(self) -> float | None:
        """A request's decoding speed at the current placement as profiled (1 / seconds per token from the PHT),
        or None before it was measured: the prior the router's steering starts from."""
        if self.current is None:
            return None
        cand = self.candidates[self.current.model]
        here = evaluate_depth(cand, profile_entry(self.pht, cand).entry, self.config, self.current.depth)
        spt = score_placements([(cand, here)], self.slo, self.hardware, self.pht, self.config)[0].seconds_per_token
        return round(1.0 / spt, 3) if spt else None

    # ------------------------------------------------------------------ status
    def status(self, last: int = 20) -> dict[str, Any]:
        """What ``/v1/helios/status`` shows: placement, breach window, PHT, recent decisions."""
        current = self.current
        est = None
        if current is not None:
            cand = self.candidates[current.model]
            entry = profile_entry(self.pht, cand).entry
            here = evaluate_depth(cand, entry, self.config, current.depth)
            est = score_placements([(cand, here)], self.slo, self.hardware, self.pht, self.config)[0]
        return {
            "slo": self.slo.value,
            "placement": current.model_dump() if current else None,
            "placement_estimate": estimate_numbers(est) if est else None,
            "shortlist": list(self.shortlisted),
            "breaches": self.breaches.snapshot(),
            "tokens_served": self.tokens_served,
            "requests_started": self.requests_started,
            "requests_done": self.requests_done,
            "quiet_until_request": self._quiet_until,
            "suppressed_storm_tokens": self.suppressed_storm_tokens,
            "quality": ({**self.quality.snapshot(), "current": v.model_dump() if (v := self.quality_verdict()) else None}
                        if self.quality is not None else None),
            "pht": self.pht.summary(),
            "decisions": [d.model_dump(mode="json") for d in self.decisions[-last:]],
        }
