"""What a run writes: the markdown table, the batch-1 targets, ``bench.json`` / ``bench.md``, the plots;
reading ``bench.json`` back (``--replot``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from vllm_cos.bench.rows import Row, rate
from vllm_cos.bench.theory import PREDICTION_NOTES


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return "/".join(_fmt(v, 2) for v in value) if value else "-"
    return str(value)


TABLE_COLUMNS = [
    ("method", "method"), ("rule", "rule"), ("param", "param"), ("T", "temperature"), ("B", "batch"),
    ("prompts", "prompts"), ("proposer", "proposer"), ("γ", "gamma"), ("tok/s (wall)", "tokens_per_s"),
    ("tok/s (cpu)", "tokens_per_cpu_s"), ("×std", "speedup_vs_standard"),
    ("×single", "speedup_vs_single"), ("×ref_std", "speedup_vs_ref_standard"),
    ("tok/step", "mean_tokens_per_step"), ("α", "alpha"), ("β", "beta"), ("per-pos α", "per_position"),
    ("c", "c"), ("pred (ours)", "predicted"),
    ("pred (paper)", "predicted_paper"), ("meas/pred", "measured_over_predicted"), ("load", "load_avg"),
    ("status", "status"),
]

# the legend under the table (and meta "notes" in bench.json)
COLUMN_NOTES = {
    "tok/s (wall)": "generated tokens / wall seconds (best repetition)",
    "tok/s (cpu)": "generated tokens / CPU seconds of this process (best repetition; robust to other load)",
    "×std": "speedup over standard collaborative decoding of the same rule/T/B/prompts, on the {clock} clock "
            "(×single, c and the targets too)",
    "×ref_std": "the plain-PyTorch peers (ref_standard, mixture (reference), ref alternate: the same "
                "loop, KV caches and models) over ref_standard of the same rule/T/B/prompts, on the {clock} clock",
    "γ": "the proposer's draft length (the served model's: 1); " + PREDICTION_NOTES["auto"],
    "pred (ours)": PREDICTION_NOTES["pred (ours)"],
    "pred (paper)": PREDICTION_NOTES["pred (paper)"],
    "load": "1-minute load average after the measurement",
}


def column_notes(clock: str = "cpu") -> dict[str, str]:
    return {k: v.format(clock=clock) for k, v in COLUMN_NOTES.items()}


def _cell(r: Row, attr: str) -> str:
    v = getattr(r, attr)
    if attr == "load_avg":
        return _fmt(v[0], 1) if v else "-"
    if attr == "temperature":
        return _fmt(v, 1)
    drafts = r.extra.get("mean_drafts_per_step")
    if attr == "gamma" and v == "auto" and drafts is not None:
        return f"auto ({drafts:.2f})"
    return _fmt(v)


def markdown_table(rows: Iterable[Row]) -> str:
    head = "| " + " | ".join(h for h, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, attr).replace("|", "/") for _, attr in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def targets_summary(rows: list[Row], clock: str = "cpu") -> list[dict]:
    """The issue's batch-1 targets, checked against the rows (figures, not tests)."""
    def find(method, rule, param, t, prompts=None):
        hits = [r for r in rows if r.method == method and r.rule == rule and r.param == param
                and r.temperature == t and r.batch == 1 and r.status == "ok" and r.proposer == "small"
                and (prompts is None or r.prompts == prompts)]
        return hits

    out = []
    for (rule, param, t, goal) in (("we", "lambda=0.5", 1.0, 1.4), ("cd", "mu=0.1", 0.0, 1.5)):
        for r in find("alternate", rule, param, t):
            out.append({"target": f"alternate {rule} {param} T={t:g} γ={r.gamma} B=1 ({r.prompts}) >= {goal}x over standard",
                        "value": r.speedup_vs_standard,
                        "met": r.speedup_vs_standard is not None and r.speedup_vs_standard >= goal})
    for r in rows:
        if r.batch == 1 and r.measured_over_predicted is not None:
            out.append({"target": f"{r.method} {r.rule} {r.param} T={r.temperature:g} γ={r.gamma} B=1 ({r.prompts}) "
                                  f"measured/predicted >= 0.85",
                        "value": r.measured_over_predicted, "met": r.measured_over_predicted >= 0.85})
    for ref in [r for r in rows if r.method == "ref_standard" and r.status == "ok"]:
        cos = [r for r in rows if r.method == "alternate" and r.key() == ref.key() and r.status == "ok"
               and r.proposer == "small"]
        for r in cos:
            ratio = rate(r, clock) / rate(ref, clock) if rate(ref, clock) else None
            out.append({"target": f"CoS alternate vs transformers standard loop {r.rule} {r.param} "
                                  f"T={r.temperature:g} γ={r.gamma} B={r.batch} ({r.prompts}) >= 3x",
                        "value": ratio, "met": ratio is not None and ratio >= 3.0})
    return out


def write_outputs(out_dir: str | Path, rows: list[Row], meta: dict) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = targets_summary(rows, meta.get("clock", "cpu"))
    data = {"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets}
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    md = [f"# CoS benchmark ({meta.get('preset', '?')})", ""]
    for k in ("command", "started", "duration_s", "models", "target", "small", "third", "device",
              "threads", "ld_preload", "load_avg_start", "load_avg_end", "clock", "c_by_batch", "warnings"):
        if k in meta:
            md.append(f"- {k}: {meta[k]}")
    md += ["", markdown_table(rows), "", "## Columns", ""]
    md += [f"- {k}: {v}" for k, v in column_notes(meta.get("clock", "cpu")).items()]
    md += ["", "## Targets (batch 1)", ""]
    for t in targets:
        md.append(f"- [{'x' if t['met'] else ' '}] {t['target']}: {_fmt(t['value'])}")
    md.append("")
    paths["md"].write_text("\n".join(md))
    return paths


def write_plots(out_dir: str | Path, rows: list[Row]) -> list[Path] | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    out = Path(out_dir)
    written = []
    ok = [r for r in rows if r.status == "ok" and r.speedup_vs_standard is not None]

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    _plot_vs_lambda(plt, ok, rows, save)
    _plot_vs_gamma(plt, ok, rows, save)
    _plot_vs_batch(plt, ok, rows, save)
    return written


def _plot_vs_lambda(plt, ok: list[Row], rows: list[Row], save) -> None:
    """Speedup vs lambda, one line per (method, proposer), batch 1, T=1."""
    labels = {"naive": "naive CoS (proposer {p})", "alternate": "CoS + APF (first proposer {p})",
              "hf_ensemble": "transformers static ensemble", "ref_standard": "transformers standard loop",
              "mixture (reference)": "mixture sampling (PyTorch loop)", "ref alternate": "CoS + APF (PyTorch loop)"}
    we = [r for r in ok if r.rule == "we" and r.param.startswith("lambda=") and r.batch == 1
          and r.method in labels]
    if we:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (method, proposer, t) in sorted({(r.method, r.proposer, r.temperature) for r in we},
                                            key=lambda x: tuple(map(str, x))):
            pts = sorted((float(r.param.split("=")[1]), r.speedup_vs_standard) for r in we
                         if (r.method, r.proposer, r.temperature) == (method, proposer, t)
                         and r.gamma in (None, _main_gamma(rows)))
            pts = _mean_by_x(pts)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[method].format(p=proposer) + f", T={t:g}")
        _finish_axes(ax, "λ (weight of the target model; its complement: the small one)")
        save(fig, "speedup_vs_lambda.png")


def _plot_vs_gamma(plt, ok: list[Row], rows: list[Row], save) -> None:
    gam = [r for r in ok if r.method in ("naive", "alternate") and r.batch == 1 and isinstance(r.gamma, int)]
    grid_sets = {r.prompts for r in gam if r.gamma != _main_gamma(rows)}
    if grid_sets:  # the grid runs on one prompt set: compare like with like
        gam = [r for r in gam if r.prompts in grid_sets]
    if len({r.gamma for r in gam}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        _plot_speedup_curves(ax, gam, "gamma")
        _finish_axes(ax, "γ (proposer draft length)")
        save(fig, "speedup_vs_gamma.png")


def _plot_vs_batch(plt, ok: list[Row], rows: list[Row], save) -> None:
    bat = [r for r in ok if r.method in ("naive", "alternate", "sd") and r.gamma in (None, _main_gamma(rows))]
    if len({r.batch for r in bat}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        _plot_speedup_curves(ax, bat, "batch")
        _finish_axes(ax, "batch size (concurrent requests)", log2=True)
        save(fig, "speedup_vs_batch.png")


def _finish_axes(ax, xlabel: str, log2: bool = False) -> None:
    """The line at speedup 1, the labels and the legend of a speedup plot."""
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup over standard")
    ax.legend(fontsize=7)


def _main_gamma(rows: list[Row]) -> int | None:
    gs = [r.extra.get("main_gamma") for r in rows if r.extra.get("main_gamma")]
    return gs[0] if gs else None


def _plot_speedup_curves(ax, rows, x_attr: str) -> None:
    """One line per (method, rule, param, T): speedup over standard against ``x_attr``."""
    for key in sorted({(r.method, r.rule, r.param, r.temperature) for r in rows}):
        pts = _mean_by_x(sorted((getattr(r, x_attr), r.speedup_vs_standard) for r in rows
                                if (r.method, r.rule, r.param, r.temperature) == key))
        if len(pts) > 1:
            method, rule, param, t = key
            ax.plot(*zip(*pts), marker="o", label=f"{method} {rule} {param} T={t:g}")


def _mean_by_x(pts):
    acc: dict = {}
    for x, y in pts:
        acc.setdefault(x, []).append(y)
    return [(x, sum(v) / len(v)) for x, v in sorted(acc.items())]


def load_rows(path: str | Path) -> tuple[list[Row], dict]:
    data = json.loads(Path(path).read_text())
    return [Row(**r) for r in data["rows"]], data.get("meta", {})


def replot(path: str | Path) -> int:
    rows, meta = load_rows(path)
    out = Path(path).parent
    paths = write_outputs(out, rows, meta)
    plots = write_plots(out, rows)
    print(plots if isinstance(plots, str) else "bench: wrote " + ", ".join(map(str, [paths["md"], *plots])))
    return 0
