"""PNG plots of a run or a sweep (matplotlib, optional: :class:`PlotsUnavailable` when it is not installed).

* ``latency_cdf.png`` - CDFs of TTFT, TPOT, ITL and E2E;
* ``exit_depth.png`` - exit-layer histogram over time (token counts per time bin and layer), placement
  changes marked;
* ``decisions.png`` - the decisions timeline: the loaded depth per model over time and the tokens' mean exit
  layer per time bin;
* ``sweep.png`` (sweeps) - achieved throughput against the offered rate, and TTFT/TPOT (p50/p99) against the
  achieved throughput.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.runner import RunResult, SweepResult


class PlotsUnavailable(RuntimeError):
    pass


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plt() -> Any:
    if not matplotlib_available():
        raise PlotsUnavailable("plots skipped: matplotlib is not installed (pip install matplotlib)")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _change_times(result: RunResult) -> list[tuple[float, str]]:
    out = []
    for c in (result.status or {}).get("changes") or []:
        if c.get("t") is not None:
            to = c.get("to") or {}
            out.append((float(c["t"]), f"{to.get('model')}@{to.get('depth')}"))
    return out


def plot_run(result: RunResult, out_dir: str | Path, prefix: str = "") -> list[Path]:
    plt = _plt()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    ok = [r for r in result.records if r.success]

    # latency CDFs
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    series = {"TTFT": [r.ttft_s for r in ok], "TPOT": [r.tpot_s for r in ok],
              "ITL": [x for r in ok for x in r.itl_s], "E2E": [r.e2e_s for r in ok]}
    for ax, (name, vals) in zip(axes.flat, series.items()):
        v = np.sort(np.asarray([x for x in vals if x is not None], dtype=float) * 1000.0)
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post")
            for p, ls in ((50, "--"), (99, ":")):
                ax.axvline(np.percentile(v, p), color="gray", ls=ls, lw=0.8, label=f"p{p}")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name} (n={v.size})")
        ax.set_xlabel("ms")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    paths.append(_save(fig, d / f"{prefix}latency_cdf.png", plt))

    # exit depth over time
    pts = [(t, layer) for r in result.records for t, layer in zip(r.token_times_s(), r.exit_layers)]
    changes = _change_times(result)
    if pts:
        t = np.array([p[0] for p in pts])
        layer = np.array([p[1] for p in pts])
        nb = int(min(60, max(5, np.sqrt(len(pts)))))
        lo, hi = int(layer.min()), int(layer.max())
        h, xe, ye = np.histogram2d(t, layer, bins=[nb, np.arange(lo - 0.5, hi + 1.5)])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
        m = ax1.pcolormesh(xe, ye, h.T, cmap="viridis", shading="auto")
        fig.colorbar(m, ax=ax1, label="tokens")
        for ct, label in changes:
            ax1.axvline(ct, color="red", lw=1)
            ax1.text(ct, hi + 0.4, label, color="red", fontsize=7, rotation=90, va="top")
        ax1.set_xlabel("time since run start (s)")
        ax1.set_ylabel("exit layer")
        ax1.set_title("Exit layer over time")
        vals, counts = np.unique(layer, return_counts=True)
        ax2.barh(vals, counts)
        ax2.set_xlabel("tokens")
        ax2.set_title("Exit layer histogram")
        fig.tight_layout()
        paths.append(_save(fig, d / f"{prefix}exit_depth.png", plt))

    # decisions timeline
    st = result.status or {}
    placements = st.get("placements") or []
    if placements or changes:
        dur = float(result.summary.get("duration_s") or 0.0)
        steps: list[tuple[float, str, int, str]] = []
        ch = [c for c in st.get("changes") or [] if c.get("t") is not None]
        if ch:
            first = ch[0].get("from") or {}
            steps.append((min(0.0, ch[0]["t"]), str(first.get("model")), int(first.get("depth") or 0), ""))
            steps += [(c["t"], str((c.get("to") or {}).get("model")), int((c.get("to") or {}).get("depth") or 0),
                       str(c.get("action") or "")) for c in ch]
        else:
            steps = [(p["t"], str(p.get("model")), int(p.get("depth") or 0), "") for p in placements]
        fig, ax = plt.subplots(figsize=(10, 4))
        models = sorted({s[1] for s in steps})
        xs = [s[0] for s in steps] + [max(dur, steps[-1][0])]
        ys = [s[2] for s in steps] + [steps[-1][2]]
        ax.step(xs, ys, where="post", color="black", lw=1.5, label="loaded depth")
        for s in steps:
            ax.annotate(f"{s[1]}@{s[2]}" + (f" ({s[3]})" if s[3] else ""), (s[0], s[2]),
                        textcoords="offset points", xytext=(3, 4), fontsize=8,
                        color=f"C{models.index(s[1]) % 10}")
        if pts:
            nb = int(min(60, max(5, np.sqrt(len(pts)))))
            sums, edges = np.histogram(t, bins=nb, weights=layer)
            cnt, _ = np.histogram(t, bins=edges)
            mid = (edges[:-1] + edges[1:]) / 2
            with np.errstate(invalid="ignore", divide="ignore"):
                ax.plot(mid, sums / cnt, "o-", ms=3, color="C1", label="mean exit layer")
        ax.set_xlabel("time since run start (s)")
        ax.set_ylabel("layers")
        ax.set_title(f"Decisions timeline ({len(ch)} placement changes)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, d / f"{prefix}decisions.png", plt))
    return paths


def plot_sweep(sweep: SweepResult, out_dir: str | Path, per_run: bool = False) -> list[Path]:
    plt = _plt()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    cur = sweep.curve
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    finite = [p for p in cur if p["rate"] is not None]
    if finite:
        ax1.plot([p["rate"] for p in finite], [p["request_throughput"] or 0 for p in finite], "o-",
                 label="achieved")
        mx = max(p["rate"] for p in finite)
        ax1.plot([0, mx], [0, mx], "--", color="gray", lw=0.8, label="offered")
    for p in cur:
        if p["rate"] is None:
            ax1.axhline(p["request_throughput"] or 0, color="C3", ls=":", label="saturation (rate inf)")
    ax1.set_xlabel("offered rate (req/s)")
    ax1.set_ylabel("throughput (req/s)")
    ax1.set_title("Throughput vs offered rate")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    x = [p["output_throughput"] or 0 for p in cur]
    for ax, metric in ((ax2, "ttft"), (ax3, "tpot")):
        for key, style in ((f"{metric}_median", "o-"), (f"{metric}_p99", "s--")):
            ax.plot(x, [p[key] if p[key] is not None else np.nan for p in cur], style,
                    label=key.replace("_", " ").replace("median", "p50"))
        for p, xi in zip(cur, x):
            if p[f"{metric}_median"] is not None:
                ax.annotate("inf" if p["rate"] is None else f"{p['rate']:g}/s", (xi, p[f"{metric}_median"]),
                            textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{metric.upper()} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [_save(fig, d / "sweep.png", plt)]
    if per_run:
        for run, p in zip(sweep.runs, cur):
            tag = "inf" if p["rate"] is None else f"{p['rate']:g}"
            paths += plot_run(run, d, prefix=f"rate-{tag}_")
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
