"""Result files (JSON) and the human-readable summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loadgen.runner import SCHEMA_RUN, SCHEMA_SWEEP, RunResult, SweepResult


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_result(result: RunResult | SweepResult, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(_clean(result.to_dict()), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def load_result(path: str | Path) -> RunResult | SweepResult:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    schema = d.get("schema")
    if schema == SCHEMA_RUN:
        return RunResult.from_dict(d)
    if schema == SCHEMA_SWEEP:
        return SweepResult.from_dict(d)
    raise ValueError(f"{path}: not a loadgen result (schema {schema!r})")


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_summary(s: dict[str, Any], title: str = "Serving benchmark result", status: dict[str, Any] | None = None
                   ) -> str:
    w = 52
    lines = [f" {title} ".center(w, "=")]

    def row(label: str, value: Any, nd: int = 2) -> None:
        lines.append(f"{label:<36}{_f(value, nd):>16}")

    row("Successful requests:", s.get("completed"))
    row("Failed requests:", s.get("failed"))
    row("Duration (s):", s.get("duration_s"))
    row("Request throughput (req/s):", s.get("request_throughput"))
    row("Output token throughput (tok/s):", s.get("output_throughput"))
    row("Total output tokens:", s.get("total_output_tokens"))
    row("Max requests in flight:", s.get("max_in_flight"))
    gp = s.get("goodput")
    if gp:
        slos = ", ".join(f"{k}<={v:g}ms" for k, v in gp["slos_ms"].items())
        row(f"Goodput (req/s) [{slos}]:" if len(slos) < 20 else "Goodput (req/s):", gp.get("request_goodput"))
        row("Requests meeting the SLOs:", f"{gp['good']}/{s.get('num_requests')}")
        if len(slos) >= 20:
            lines.append(f"  SLOs: {slos}")
    lines.append("-" * w)
    lines.append(f"{'':<14}{'mean':>9}{'median':>10}{'p90':>9}{'p99':>10}")
    for label, key, nd in (("TTFT (ms)", "ttft_ms", 1), ("TPOT (ms)", "tpot_ms", 1), ("ITL (ms)", "itl_ms", 1),
                           ("E2E (ms)", "e2e_ms", 1), ("Output tokens", "output_tokens", 1),
                           ("Exit layer", "exit_layer", 2), ("Confidence", "confidence", 3)):
        st = s.get(key) or {}
        if not st.get("n"):
            continue
        lines.append(f"{label:<14}{_f(st.get('mean'), nd):>9}{_f(st.get('median'), nd):>10}"
                     f"{_f(st.get('p90'), nd):>9}{_f(st.get('p99'), nd):>10}")
    kinds = s.get("by_kind") or {}
    if len(kinds) > 1:
        lines.append("-" * w)
        lines.append(f"{'kind':<14}{'done':>9}{'ttft p50':>10}{'tpot p50':>9}{'exit':>10}")
        for k, v in kinds.items():
            lines.append(f"{k[:14]:<14}{_f(v['completed']):>9}{_f(v['ttft_ms_median'], 1):>10}"
                         f"{_f(v['tpot_ms_median'], 1):>9}{_f(v['exit_layer_mean'], 2):>10}")
    if s.get("served_models"):
        lines.append("-" * w)
        lines.append("Served by: " + ", ".join(f"{k} ({v})" for k, v in s["served_models"].items()))
    if status:
        ch = status.get("changes") or []
        lines.append(f"Status polls: {status.get('polls', 0)} ({status.get('errors', 0)} failed); "
                     f"placement changes: {len(ch)}")
        for c in ch[-5:]:
            fr, to = c.get("from") or {}, c.get("to") or {}
            t = c.get("t")
            lines.append(f"  t={_f(t, 1)}s {fr.get('model')}@{fr.get('depth')} -> {to.get('model')}@{to.get('depth')}"
                         f" ({c.get('action')}: {c.get('trigger')})")
    if s.get("errors"):
        lines.append("Errors:")
        for msg, n in s["errors"].items():
            lines.append(f"  {n} x {msg[:100]}")
    lines.append("=" * w)
    return "\n".join(lines)


def format_curve(curve: list[dict[str, Any]]) -> str:
    head = f"{'rate':>8}{'req/s':>9}{'tok/s':>10}{'ttft p50':>10}{'ttft p99':>10}{'tpot p50':>10}{'tpot p99':>10}" \
           f"{'failed':>8}"
    lines = [" Throughput-latency sweep ".center(len(head), "="), head]
    for p in curve:
        rate = "inf" if p["rate"] is None else f"{p['rate']:g}"
        lines.append(f"{rate:>8}{_f(p['request_throughput']):>9}{_f(p['output_throughput'], 1):>10}"
                     f"{_f(p['ttft_median'], 1):>10}{_f(p['ttft_p99'], 1):>10}{_f(p['tpot_median'], 1):>10}"
                     f"{_f(p['tpot_p99'], 1):>10}{_f(p['failed']):>8}")
    lines.append("=" * len(head))
    return "\n".join(lines)
