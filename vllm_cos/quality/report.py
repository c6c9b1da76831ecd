"""The quality benchmark's outputs: a markdown table, the findings, and NLL vs lambda."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from vllm_cos.quality.scoring import MIXED, paired_difference

COLUMNS = ("general", "numeric", MIXED)


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(results: Sequence[dict]) -> str:
    """Rows x {general, numeric, mixed} x {NLL, top-1} (NLL in nats per token)."""
    head = "| row | " + " | ".join(f"{c} NLL | {c} top-1" for c in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(COLUMNS))]
    for r in results:
        cells = []
        for c in COLUMNS:
            s = r["summary"][c]
            cells += [_cell(s["nll"] if r["nll"] else None, 3), _cell(s["top1"], 3)]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_kind(results: Sequence[dict], kind: str, schedule: str = "standard") -> list[dict]:
    return [r for r in results if r["kind"] == kind and (kind != "we" or r["schedule"] == schedule)]


def _vs(row: dict, other: dict, key: str = "per_window_nll") -> str:
    d, se = paired_difference(row[key], other[key])
    return f"{d:+.3f} ± {se:.3f}"


def _single(results: Sequence[dict]) -> dict:
    return {r["members"][0]: r for r in results if r["kind"] == "single"}


def findings(results: Sequence[dict], experts: Sequence[str]) -> list[str]:
    """Plain sentences: WE's best lambda against each expert on the mixed set (paired over windows:
    mean difference ± standard error), the best lambda per domain, where CD and CoSD land."""
    single, we, out = _single(results), _by_kind(results, "we"), []
    mixed = lambda r, k="nll": r["summary"][MIXED][k]  # noqa: E731
    best = min(we, key=mixed) if we else None
    if best is not None:
        for e in (e for e in experts if e in single):
            out.append(f"mixed: {best['label']} (best λ) NLL {mixed(best):.3f} vs {e} alone {mixed(single[e]):.3f} "
                       f"({_vs(best, single[e])} nats/token), top-1 {mixed(best, 'top1'):.3f} vs "
                       f"{mixed(single[e], 'top1'):.3f} ({_vs(best, single[e], 'per_window_top1')})")
        per_domain = {d: min(we, key=lambda r: r["summary"][d]["nll"]) for d in COLUMNS}
        out.append("best λ by NLL: " + ", ".join(f"{d} {r['value']:g} ({r['summary'][d]['nll']:.3f})"
                                                for d, r in per_domain.items()))
    for r in _by_kind(results, "cd"):
        ref = single.get(r["members"][0])
        vs = f" vs {r['members'][0]} alone {mixed(ref):.3f} ({_vs(r, ref)})" if ref else ""
        out.append(f"mixed: {r['label']}: NLL {mixed(r):.3f}{vs}, top-1 {mixed(r, 'top1'):.3f}"
                   + (f" vs {mixed(ref, 'top1'):.3f}" if ref else ""))
    for r in _by_kind(results, "cosd"):
        others = [single[m] for m in r["members"][::-1] if m in single] + ([best] if best else [])
        out.append(f"mixed: {r['label']}: top-1 {mixed(r, 'top1'):.3f} vs " + ", ".join(
            f"{o['label']} {mixed(o, 'top1'):.3f} ({_vs(r, o, 'per_window_top1')})" for o in others))
    ranked = sorted(results, key=lambda r: -mixed(r, "top1"))
    out.append("mixed top-1, best first: " + ", ".join(f"{r['label']} {mixed(r, 'top1'):.3f}" for r in ranked))
    return out


def plot(results: Sequence[dict], experts: Sequence[str], path: Path) -> str:
    """NLL vs lambda per domain, the experts alone as horizontal lines; a message if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    we = sorted(_by_kind(results, "we"), key=lambda r: r["value"])
    alternate = _by_kind(results, "we", "alternate")
    single = {r["members"][0]: r for r in results if r["kind"] == "single"}
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 3.6), sharey=False)
    for ax, domain in zip(axes, COLUMNS):
        ax.plot([r["value"] for r in we], [r["summary"][domain]["nll"] for r in we], "o-", label="WE (standard)")
        if alternate:
            ax.plot([r["value"] for r in alternate], [r["summary"][domain]["nll"] for r in alternate], "x",
                    markersize=10, color="black", label="WE (alternate)")
        for e, style, color in zip(experts, ("--", ":"), ("tab:red", "tab:green")):
            if e in single:
                ax.axhline(single[e]["summary"][domain]["nll"], linestyle=style, color=color, label=f"{e} alone")
        ax.set_xlim(0, 1)
        ax.set_title(domain)
        ax.set_xlabel(f"λ (weight of {experts[0]}; 1 − λ on {experts[1]})")
        ax.set_ylabel("NLL (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
