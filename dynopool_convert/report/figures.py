"""Figures of the report as PNG bytes (matplotlib, Agg canvas: no display, no global pyplot state).

- ``shapes_figure``: the feature-map size of every stage, as converted (top row) and learned
  (bottom row), one rectangle per stage drawn to scale, as in Figure 1 of the paper;
- ``history_figure``: the scale factors (and FLOPs, accuracy when recorded) over training.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from ..files import atomic_write_bytes, check_output_dir
from .text import si, site_label

__all__ = ["shapes_figure", "history_figure", "history_plot", "figures", "write_figures", "history_series", "CAPTIONS"]

#: what each figure shows (the HTML report's captions), by file name
CAPTIONS = {
    "shapes.png": "Feature-map size (H×W) of every stage, drawn to scale: as converted (top) and as learned (bottom).",
    "scale_factors.png": "Scale factors r = 1/stride of every group over training (r_h solid, r_w dashed), "
                         "with the saved model's FLOPs against the budget and the accuracy.",
}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def shapes_figure(report: dict[str, Any]) -> bytes:
    """Feature-map shapes through the network, converted vs learned, to scale (PNG)."""
    stages = report["stages"]
    rows = [("as converted", "size_init"), ("learned", "size")]
    widest = max(max(s["size"][1], s["size_init"][1]) for s in stages)
    gap = 0.2 * widest
    # each stage gets a slot at least 0.35x the widest so the labels of small maps do not collide
    widths = [max(s["size"][1], s["size_init"][1], 0.35 * widest) for s in stages]
    tallest = max(max(s["size"][0], s["size_init"][0]) for s in stages)
    total = sum(widths) + gap * (len(stages) - 1)
    fig = Figure(figsize=(min(2.0 + 1.6 * len(stages), 16), 4.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    labels = {s["name"]: site_label(s) for s in report.get("sites") or []}
    for ax, (label, key) in zip(axes, rows):
        x = 0.0
        for stage, slot in zip(stages, widths):
            h, w = stage[key]
            ax.add_patch(Rectangle((x + (slot - w) / 2, (tallest - h) / 2), w, h, facecolor="#9ecae1", edgecolor="#08519c"))
            ax.text(x + slot / 2, -0.06 * tallest, f"{h}×{w}", ha="center", va="top", fontsize=8)
            x += slot + gap
        ax.set_xlim(-gap / 2, total + gap / 2)
        ax.set_ylim(-0.25 * tallest, tallest * 1.05)
        ax.set_aspect("equal")
        ax.set_ylabel(label)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    x = 0.0
    for stage, slot in zip(stages, widths):
        axes[0].text(x + slot / 2, tallest * 1.04, labels.get(stage["name"], str(stage["name"])), ha="center", va="bottom", fontsize=7, rotation=15)
        x += slot + gap
    fig.suptitle(f"{report['model']}: feature-map sizes (H×W) at input {report['input_size'][1]}×{report['input_size'][2]}")
    return _png(fig)


def history_series(report: dict[str, Any]) -> dict[str, Any] | None:
    """Plot-ready series from ``report['history']``: x, per-group r_h/r_w, flops, accuracy.

    Entries are dicts; ``epoch`` or ``step`` is the x axis (else the index); scale factors are
    read from ``r`` (group -> [r_h, r_w]) or ``strides`` (group -> [s_h, s_w], inverted).
    """
    history = report.get("history")
    if not isinstance(history, list) or not history or not all(isinstance(h, dict) for h in history):
        return None
    xkey = next((k for k in ("epoch", "step") if all(k in h for h in history)), None)
    x = [h[xkey] for h in history] if xkey else list(range(len(history)))
    r: dict[str, list[tuple[float, float] | None]] = {}
    for i, h in enumerate(history):
        values = h.get("r")
        if not isinstance(values, dict) and isinstance(h.get("strides"), dict):
            values = {g: [1.0 / v[0], 1.0 / v[1]] for g, v in h["strides"].items()}
        for g, v in (values or {}).items():
            r.setdefault(str(g), [None] * len(history))[i] = (float(v[0]), float(v[1]))
    flops = [h.get("flops") for h in history]
    acc_keys = [k for k in history[-1] if ("acc" in k.lower() or "top" in k.lower()) and isinstance(history[-1][k], (int, float))]
    if not r:
        return None
    return {
        "x": x, "xlabel": xkey or "entry", "r": r,
        "flops": flops if any(isinstance(f, (int, float)) for f in flops) else None,
        "accuracy": {k: [h.get(k) for h in history] for k in acc_keys},
    }


def history_figure(report: dict[str, Any]) -> bytes | None:
    """Scale factors (r_h solid, r_w dashed, per group), FLOPs and accuracy over training (PNG)."""
    fig = history_plot(report)
    return None if fig is None else _png(fig)


def history_plot(report: dict[str, Any]) -> Figure | None:
    """The figure of ``history_figure`` (None without a history of scale factors)."""
    series = history_series(report)
    if series is None:
        return None
    panels = 1 + (series["flops"] is not None) + bool(series["accuracy"])
    # constrained layout: no blank band between the title and the first panel
    fig = Figure(figsize=(7, 2.4 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    x = series["x"]
    ax = axes[0]
    for i, (group, values) in enumerate(series["r"].items()):
        color = f"C{i % 10}"
        pts = [(xi, v) for xi, v in zip(x, values) if v is not None]
        ax.plot([p[0] for p in pts], [p[1][0] for p in pts], color=color, label=f"group {group} r_h")
        ax.plot([p[0] for p in pts], [p[1][1] for p in pts], color=color, linestyle="--", label=f"group {group} r_w")
    ax.set_ylabel("scale factor r")
    ax.legend(fontsize=7, ncol=2)
    k = 1
    if series["flops"] is not None:
        axes[k].plot(x, [f if isinstance(f, (int, float)) else float("nan") for f in series["flops"]], color="k")
        if report.get("budget"):
            axes[k].axhline(report["budget"], color="r", linestyle=":", label="budget")
            axes[k].legend(fontsize=7)
        axes[k].set_ylabel("FLOPs")
        axes[k].yaxis.set_major_formatter(FuncFormatter(lambda v, _: si(v)))  # 5.04M, as in the tables
        k += 1
    if series["accuracy"]:
        for name, values in series["accuracy"].items():
            axes[k].plot(x, [v if isinstance(v, (int, float)) else float("nan") for v in values], label=name)
        axes[k].set_ylabel("accuracy")
        axes[k].legend(fontsize=7)
    for ax in axes:  # every panel is read on its own: each gets its x axis labelled
        ax.tick_params(labelbottom=True)
        ax.set_xlabel(series["xlabel"])
    fig.suptitle(f"{report['model']}: scale factors over training")
    return fig


def figures(report: dict[str, Any]) -> dict[str, bytes]:
    """All figures that apply to ``report``: file name -> PNG bytes."""
    out = {"shapes.png": shapes_figure(report)}
    history = history_figure(report)
    if history is not None:
        out["scale_factors.png"] = history
    return out


def write_figures(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write the figures of ``report`` into ``directory`` (created if needed); their paths."""
    directory = check_output_dir(directory, "figures")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in figures(report).items():
        path = directory / name
        atomic_write_bytes(path, png)
        paths.append(path)
    return paths
