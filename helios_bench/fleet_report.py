"""The text table and the combined PNG of ``helios-ray bench serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _columns(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cols = []
    if "helios" in res:
        cols.append(("helios (fleet)", res["helios"]))
    for m, s in (res.get("best_single") or {}).items():
        cols.append((f"single {m}" + (" *" if m == res.get("best_single_model") else ""), s))
    if "plain" in res:
        cols.append((f"plain {res['plain']['model']}", res["plain"]))
    return cols


def system_table(res: dict[str, Any]) -> list[str]:
    cols = _columns(res)

    def cls(s: dict[str, Any], kind: str, key: str, fmt: str = "{:.1f}") -> str:
        return _f((s.get("per_class") or {}).get(kind, {}).get(key), fmt)

    def exits(s: dict[str, Any]) -> str:
        return "; ".join(f"{m}: " + ", ".join(f"{d}={v:.0%}" for d, v in sh.items())
                         for m, sh in (s.get("exit_share_by_model") or {}).items()) or "-"

    rows = [
        ("placement", lambda s: ", ".join(f"{r['model']}@{r['depth']}" + (f" exits {r['token_exits']}"
                                                                          if r.get("token_exits") else "")
                                          for r in s["replicas"])),
        ("output tok/s", lambda s: _f(s["output_throughput"])),
        ("  chat / code tok/s",
         lambda s: f"{cls(s, 'chat', 'output_throughput')} / {cls(s, 'code', 'output_throughput')}"),
        ("TTFT p50 / p99 ms", lambda s: f"{_f(s['ttft_ms']['p50'])} / {_f(s['ttft_ms']['p99'])}"),
        ("TPOT p50 / p99 ms", lambda s: f"{_f(s['tpot_ms']['p50'])} / {_f(s['tpot_ms']['p99'])}"),
        ("  chat / code TPOT p50", lambda s: f"{cls(s, 'chat', 'tpot_ms_p50')} / {cls(s, 'code', 'tpot_ms_p50')}"),
        ("max concurrency", lambda s: _f(s["max_concurrency"], "{}")),
        ("HumanEval pass@1", lambda s: _f(s.get("pass_at_1"), "{:.1%}")
         + f" ({cls(s, 'code', 'passed', '{}')}/{cls(s, 'code', 'problems', '{}')})"),
        ("chat agreement", lambda s: cls(s, "chat", "agreement", "{:.1%}")),
        ("chat perplexity", lambda s: cls(s, "chat", "perplexity", "{:.3f}")),
        ("served by", lambda s: "; ".join(f"{m}: {c}" for m, c in (s.get("served_by_model") or {}).items())),
        ("exit depth shares", exits),
        ("energy J/token",
         lambda s: "n/a" if s.get("energy_j_per_token") is None else f"{s['energy_j_per_token']:.4f}"),
        ("completed", lambda s: f"{s['completed']}/{s['requests']}"),
    ]
    w0 = max(len(k) for k, _ in rows)
    cells = [[fn(s) for _, fn in rows] for _, s in cols]
    widths = [max(len(name), *(len(c) for c in col)) for (name, _), col in zip(cols, cells)]
    lines = ["  ".join([" " * w0] + [n.ljust(w) for (n, _), w in zip(cols, widths)])]
    for i, (k, _) in enumerate(rows):
        lines.append("  ".join([k.ljust(w0)] + [col[i].ljust(w) for col, w in zip(cells, widths)]))
    return lines


def format_table(res: dict[str, Any]) -> str:
    b = res["budgets"]
    lines = [f"budget per replica: {res['headline_budget']} = {b[res['headline_budget'] + '_mb']} MiB "
             f"(tight {b['tight_mb']} MiB: {b['rule']}; roomy {b['roomy_mb']} MiB), dtype {b['dtype']}; "
             f"* = best single model ({res.get('config', {}).get('best_by')})", ""]
    lines += system_table(res)
    if res.get("roomy"):
        lines += ["", f"roomy budget ({b['roomy_mb']} MiB):"] + system_table({**res["roomy"]})
    lines.append("")
    for k, v in res["ratios"].items():
        lines.append(f"{k}: {v}")
    lines.append("ratios_roomy: " + ", ".join(f"{k}={v}" for k, v in res["ratios_roomy"].items()))
    lines.append("")
    lines.append("max concurrency by budget (MiB): " + "; ".join(
        f"{k}: " + ", ".join(f"{mb}={n}" for mb, n in (v or {}).items())
        for k, v in res.get("max_concurrency_sweep", {}).items()))
    for name, s in _columns(res):
        for a in s.get("max_concurrency_arithmetic") or []:
            lines.append(f"  {name}: {a}")
    tl = res.get("routing_timeline")
    if tl:
        lines.append("")
        lines.append("fleet routing by phase (0 = chat-heavy, 1 = code-heavy): " + "; ".join(
            f"phase {p}: " + ", ".join(f"{kind} -> {d}" for kind, d in ks.items())
            for p, ks in tl["split_by_phase"].items()))
    for name, s in _columns(res):
        if s.get("curve"):
            lines.append(f"{name} rate sweep (req/s: output tok/s, TPOT p50 ms, TTFT p50 ms): " + "; ".join(
                f"{pt.get('rate')}: {_f(pt.get('output_throughput'))}, {_f(pt.get('tpot_median'))}, "
                f"{_f(pt.get('ttft_median'))}" for pt in s["curve"]))
    lines.append(f"wall {res['wall_s']} s")
    return "\n".join(lines)


def plot_combined(res: dict[str, Any], path: Path) -> Path:
    """Left: throughput-latency curves (output tok/s vs p50 TPOT) of every system from the rate sweep, with the
    closed-loop point; right: the fleet's routing split over the saturation run, the shift marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6))
    for name, s in _columns(res):
        pts = [(p.get("output_throughput"), p.get("tpot_median")) for p in s.get("curve") or []
               if p.get("output_throughput") is not None and p.get("tpot_median") is not None]
        line = ax1.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)[0] if pts else None
        if s["tpot_ms"]["p50"] is not None:
            ax1.scatter([s["output_throughput"]], [s["tpot_ms"]["p50"]], marker="*", s=140,
                        color=line.get_color() if line else None, label=None if line else name)
    ax1.set_xlabel("output tokens/s")
    ax1.set_ylabel("p50 TPOT (ms)")
    ax1.set_title(f"rate sweep (o) and closed loop (*), {res['headline_budget']} budget")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    tl = res.get("routing_timeline")
    if tl and tl["rows"]:  # one mark per request: its serving model's lane, shape by class, colour by phase
        rows = tl["rows"]
        models = sorted({r[2] for r in rows if r[2]})
        lane = {m: k for k, m in enumerate(models)}
        for kind, marker in (("chat", "o"), ("code", "s")):
            for phase, colour in ((0, "tab:blue"), (1, "tab:orange")):
                dy = -0.12 if kind == "chat" else 0.12  # chat just below its lane, code just above
                pts = [(r[0], lane[r[2]] + dy) for r in rows if r[1] == kind and r[3] == phase and r[2] in lane]
                if pts:
                    ax2.scatter([x for x, _ in pts], [y for _, y in pts], marker=marker, color=colour, alpha=0.7,
                                label=f"{kind}, {'chat-heavy' if phase == 0 else 'code-heavy'} half")
        shift = [r[0] for r in rows if r[3] == 1]
        if shift:
            ax2.axvline(min(shift), color="r", linestyle="--", label="first request after the shift")
        for p, ks in tl["split_by_phase"].items():
            txt = "; ".join(f"{kind}: " + ", ".join(f"{m.split('-')[0]} {c}" for m, c in d.items())
                            for kind, d in ks.items())
            ax2.annotate(f"phase {p}: {txt}", (0.01, 0.97 - 0.05 * int(p)), xycoords="axes fraction", fontsize=7,
                         va="top")
        ax2.set_yticks(range(len(models)), models)
        ax2.set_ylim(-0.5, len(models) - 0.5 + 0.6)
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)  # below the axes
    ax2.set_xlabel("request start (s) in the fleet's closed-loop run")
    ax2.set_title("fleet routing split across the shift")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
