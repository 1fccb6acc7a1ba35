"""Plot the clip ranges implied by a record's KV-cache factors, to spot outliers.

With ``q = clip(round(x/s) + o, -128, 127)`` (SPEC §3) a channel represents exactly
``[(-128 - o) * s, (127 - o) * s]``; anything outside is clipped. The report shows,
per layer, the band over all channels plus every channel's ends as dots, and the
ratio of the widest channel range to the median one: a layer where one channel needs
a far wider range than the rest (ratio > 4) wastes most of its INT8 grid when
quantized per tensor, and is the first place to look when accuracy drops.

The record alone is enough: ranges come from the factors, not from activations.
matplotlib is imported only when a report is drawn, and only through its object API
with the Agg canvas, so no display is needed and pyplot's global state is untouched.
"""
from __future__ import annotations

import math
import os
import statistics

from ..algorithms.convention import clip_range
from ..errors import ExportError
from ..export.checks import placeholder_channels
from ..fileio import atomic_replace, check_output_path
from ..naming import layer_index, layer_kind
from ..record.files import load_kv_factors

__all__ = ["OUTLIER_RATIO", "layer_clip_stats", "plot_report"]

# A channel range this many times the layer's median marks the layer as an outlier.
OUTLIER_RATIO = 4.0
_MAX_TICKS = 48
_KIND_TITLE = {"key": "keys (k_proj)", "value": "values (v_proj)", "unknown": "other layers"}
# Above the axes, right of the (left-aligned) title: never on top of a bar.
_LEGEND = dict(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4,
               frameon=False, borderaxespad=0.2)
_KIND_COLOR = {"key": "tab:blue", "value": "tab:orange", "unknown": "tab:gray"}


def layer_clip_stats(scales, offsets) -> dict:
    """Clip range per channel and its summary for one layer's factors. A zero-range
    placeholder channel (:mod:`amct_hf.export.checks`) only ever held 0: it is drawn at 0
    and counts in neither the median nor the widest range."""
    dead = placeholder_channels(scales, offsets)
    x_min, x_max = zip(*((0.0, 0.0) if d else clip_range(s, o) for s, o, d in zip(scales, offsets, dead)))
    x_min, x_max = list(x_min), list(x_max)
    ranges = [hi - lo for lo, hi in zip(x_min, x_max)]
    live = [c for c in range(len(ranges)) if not dead[c]]
    median = statistics.median(ranges[c] for c in live)
    worst = max(live, key=ranges.__getitem__)  # first of equal widest
    ratio = ranges[worst] / median if median > 0 else math.inf
    return {
        "channels": len(ranges),
        "min_clip": min(x_min),
        "max_clip": max(x_max),
        "median_range": median,
        "max_range": ranges[worst],
        "worst_channel": worst,
        "range_ratio": ratio,
        "outlier": ratio > OUTLIER_RATIO,
        "x_min": x_min,
        "x_max": x_max,
    }


def _kind(name: str) -> str:
    return layer_kind(name) or "unknown"


def _order(names: list[str]) -> list[str]:
    # By decoder layer index; names without one keep record order, after the indexed ones.
    def key(item):
        pos, name = item
        idx = layer_index(name)
        return (0, idx, pos) if idx is not None else (1, pos, pos)
    return [name for _, name in sorted(enumerate(names), key=key)]


def _label(name: str) -> str:
    idx = layer_index(name)
    return str(idx) if idx is not None else name.rsplit(".", 1)[-1][:16]


def _set_ticks(ax, labels: list[str]) -> None:
    step = max(1, math.ceil(len(labels) / _MAX_TICKS))  # keep long models readable
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], fontsize=7,
                       rotation=90 if any(len(labels[i]) > 3 for i in ticks) else 0)
    ax.set_xlim(-0.75, max(len(labels), 1) - 0.25)


def _clip_panel(ax, names, stats, kind, per_channel: bool = True) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.set_title(f"{_KIND_TITLE[kind]}: clip range per layer", fontsize=10, loc="left")
    ax.set_ylabel("clip range (activation value)")
    if not names:
        ax.text(0.5, 0.5, f"no {_KIND_TITLE[kind]} in the record", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        return
    xs = list(range(len(names)))
    st = [stats[n] for n in names]
    ax.bar(xs, [s["max_clip"] - s["min_clip"] for s in st], bottom=[s["min_clip"] for s in st],
           width=0.7, color=_KIND_COLOR[kind], alpha=0.25,
           edgecolor=["red" if s["outlier"] else "none" for s in st], linewidth=1.5)
    if per_channel:
        px, hi, lo = [], [], []
        for x, s in zip(xs, st):
            px += [x] * s["channels"]
            hi += s["x_max"]
            lo += s["x_min"]
        ax.scatter(px, hi, s=3, color="tab:green", linewidths=0, zorder=3)
        ax.scatter(px, lo, s=3, color="tab:purple", linewidths=0, zorder=3)
    for x, s in zip(xs, st):
        if s["outlier"]:
            w = s["worst_channel"]
            ax.scatter([x, x], [s["x_max"][w], s["x_min"][w]], s=36, marker="x",
                       color="red", zorder=4)
            ax.annotate(f"ch {w}\n{s['range_ratio']:.1f}x", (x, s["max_clip"]),
                        textcoords="offset points", xytext=(0, 3), ha="center",
                        va="bottom", fontsize=7, color="red")
    ax.axhline(0, color="black", linewidth=0.5)
    # Set by hand: bars make their bottoms sticky, so margins() would cut the outlier marks.
    lo, hi = min(s["min_clip"] for s in st), max(s["max_clip"] for s in st)
    pad = 0.08 * (hi - lo)
    ax.set_ylim(lo - pad, hi + 3 * pad)
    _set_ticks(ax, [_label(n) for n in names])
    ax.set_xlabel("layer")
    if not per_channel:
        ax.legend(handles=[Patch(facecolor=_KIND_COLOR[kind], alpha=0.25,
                                 label="per-tensor clip range")], **_LEGEND)
        return
    ax.legend(handles=[
        Patch(facecolor=_KIND_COLOR[kind], alpha=0.25, label="min..max over channels"),
        Line2D([], [], marker="o", ls="", ms=3, color="tab:green", label="channel x_max"),
        Line2D([], [], marker="o", ls="", ms=3, color="tab:purple", label="channel x_min"),
        Line2D([], [], marker="x", ls="", ms=6, color="red",
               label=f"outlier: widest channel > {OUTLIER_RATIO:g}x median"),
    ], **_LEGEND)


def _ratio_panel(ax, names, stats) -> None:
    from matplotlib.patches import Patch

    ax.set_title("widest / median channel range per layer", fontsize=10, loc="left")
    # One slot per decoder layer with its K and V bars side by side, so a tick label
    # names every bar; names without a layer index get a slot of their own.
    groups: dict = {}
    for n in names:
        idx = layer_index(n)
        groups.setdefault(idx if idx is not None else ("name", n), []).append(n)
    # inf (median 0) cannot be drawn; scales are positive, so it only guards hand-made input.
    finite = [stats[n]["range_ratio"] for n in names if math.isfinite(stats[n]["range_ratio"])]
    top = max(finite + [OUTLIER_RATIO]) * 1.15
    for x, members in enumerate(groups.values()):
        width = 0.8 / len(members)
        for j, n in enumerate(members):
            s = stats[n]
            ax.bar(x + (j - (len(members) - 1) / 2) * width, min(s["range_ratio"], top),
                   width=width * 0.9, color=_KIND_COLOR[_kind(n)],
                   edgecolor="red" if s["outlier"] else "none", linewidth=1.5)
    ax.axhline(1, color="black", linewidth=0.5)
    ax.set_ylim(0, top)
    ax.set_ylabel("ratio")
    _set_ticks(ax, [_label(g[0]) for g in groups.values()])
    ax.set_xlabel("layer")
    kinds = [k for k in _KIND_TITLE if any(_kind(n) == k for n in names)]
    threshold = ax.axhline(OUTLIER_RATIO, color="red", linestyle="--", linewidth=1,
                           label=f"outlier threshold ({OUTLIER_RATIO:g}x)")
    ax.legend(handles=[Patch(color=_KIND_COLOR[k], label=_KIND_TITLE[k]) for k in kinds]
              + [threshold], **_LEGEND)


def _image_format(out_png: str, canvas) -> str:
    ext = os.path.splitext(out_png)[1].lower().lstrip(".")
    if not ext:
        return "png"
    if ext not in canvas.get_supported_filetypes():
        raise ExportError(f"cannot write a report to {out_png}: unsupported image type "
                         f"'.{ext}' (use .png)")
    return ext


def plot_report(record_file: str | os.PathLike, out_png: str | os.PathLike, *,
                title: str | None = None) -> dict:
    """Draw the record's clip ranges to ``out_png``; returns the per-layer summary.

    Summary: ``{"record", "image", "outlier_ratio", "outliers": [layer, ...],
    "layers": {layer: {"kind", "index", "channels", "min_clip", "max_clip",
    "median_range", "max_range", "worst_channel", "range_ratio", "outlier"}}}``,
    layers in plot order (decoder layer index, then record order).
    """
    record_file, out_png = os.fspath(record_file), os.fspath(out_png)
    factors, _ = load_kv_factors(record_file)
    check_output_path(record_file, out_png)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ExportError(f"the report needs matplotlib ({e}); pip install matplotlib") from None

    names = _order(list(factors))
    stats = {n: layer_clip_stats(*factors[n]) for n in names}
    by_kind = {k: [n for n in names if _kind(n) == k] for k in ("key", "value", "unknown")}
    kinds = ["key", "value"] + (["unknown"] if by_kind["unknown"] else [])

    # per-tensor records have one range per layer: no channel dots, no channel-ratio panel
    per_channel = any(st["channels"] > 1 for st in stats.values())
    n_panels = len(kinds) + per_channel
    widest = max(len(v) for v in by_kind.values())
    fig = Figure(figsize=(min(40.0, max(10.0, 0.22 * widest + 3)), 3.4 * n_panels), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fmt = _image_format(out_png, canvas)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, kinds):
        _clip_panel(ax, by_kind[kind], stats, kind, per_channel)
    if per_channel:
        _ratio_panel(axes[-1], names, stats)
    fig.suptitle(title or f"KV-cache INT8 clip ranges: {os.path.basename(record_file)}",
                 fontsize=12)
    fig.tight_layout()
    atomic_replace(out_png, lambda tmp: fig.savefig(tmp, format=fmt))

    public = ("channels", "min_clip", "max_clip", "median_range", "max_range",
              "worst_channel", "range_ratio", "outlier")
    layers = {n: {"kind": _kind(n), "index": layer_index(n),
                  **{k: stats[n][k] for k in public}} for n in names}
    return {
        "record": record_file,
        "image": out_png,
        "outlier_ratio": OUTLIER_RATIO,
        "outliers": [n for n in names if stats[n]["outlier"]],
        "layers": layers,
    }
