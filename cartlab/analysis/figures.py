"""What the analyses' figures share: selecting runs (`where`), refusing to pool variants, axis
formatting (plain log ticks, counts as 12k / 1.5M, widths as trained), one colour and label per
variant, one panel per validation domain, and a figure's PNG bytes for a widget.

Figures live with their analysis (`cartlab.analysis.plots` lists where); they take results-schema
frames and return a `matplotlib.figure.Figure` (no pyplot, no global state); nothing is shown or
saved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cartlab.analysis.schema import describe_variants, display_labels, validate, with_variants

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def select_runs(runs: pd.DataFrame, where: dict | None) -> pd.DataFrame:
    """The runs (variant columns filled) whose columns equal every `where` value, e.g.
    {"stage": "stage2", "n_loops": 6}; ValueError for an unknown column or when none is left."""
    validate(runs, "runs")
    runs = with_variants(runs)  # so `where` can name variant, overrides or variant_label
    for col, val in (where or {}).items():
        if col not in runs.columns:
            raise ValueError(f"where: unknown runs column {col!r}; allowed: {list(runs.columns)}")
        runs = runs[runs[col] == val]
    if runs.empty:
        raise ValueError(f"where: no runs match {where}")
    return runs


def one_variant_per(frame: pd.DataFrame, keys: list[str], what: str) -> None:
    """Refuse to average rows of different variants into one point (they are not seeds of one
    configuration): name the first cell of `keys` that holds several."""
    counts = frame.groupby(keys, dropna=False)["variant"].nunique()
    if (counts > 1).any():
        cell = counts.index[counts > 1][0]
        cell = cell if isinstance(cell, tuple) else (cell,)
        rows = frame[(frame[keys] == pd.Series(dict(zip(keys, cell)))).all(axis=1)]
        where = ", ".join(f"{k}={v}" for k, v in zip(keys, cell))
        raise ValueError(f"{what}: {where} holds several variants, not seeds of one configuration: "
                         f"{describe_variants(rows, rows['variant'])}; narrow `where` (e.g. overrides='')")


# -- axes -------------------------------------------------------------------------------------------------
SHORT_KEYS = {"prelude_layers": "P", "n_loops": "R", "n_layers": "L", "model": ""}


def key_label(key: str, value) -> str:
    """"R=4" for n_loops 4.0, "cart" for model cart: the section 3.5 notation of a config column."""
    value = f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)
    short = SHORT_KEYS.get(key, key)
    return f"{short}={value}" if short else value


def width_ticks(ax, x: str, values) -> None:
    """On a log axis of widths, ticks at the widths trained (256, 512, ...), not 3x10^2."""
    if x == "d_model":
        from matplotlib.ticker import NullFormatter

        values = sorted(set(int(v) for v in values))
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())


def plain_log_y(ax) -> None:
    """A log y axis labelled 0.9, 20, 30 or 100, 1000 rather than 9e-01, 2x10^1 or 10^3: matplotlib's
    LogFormatter picks which ticks get a label (fewer as the range grows), %g writes it."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def count_label(value: float, _pos=None) -> str:
    """A count as people write it: 64, 950, 12k, 1.5M, 2B, 3T."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def sci_label(value: float, _pos=None) -> str:
    """FLOPs as 3e13 (not 3x10^13)."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def log_ticks(axis, style=count_label) -> None:
    """Readable ticks on a log axis, set after its limits: decades when it spans three, else 1-2-5
    steps of each decade, finer steps only when the axis spans less than a factor 2.5; labelled
    by `style`, no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    for subs, enough in (((1.0,), 3), ((1.0, 2.0, 5.0), 2), ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0), 2),
                         (tuple(float(s) for s in range(1, 10)), 0)):
        ticks = [t for t in LogLocator(10, subs=subs).tick_values(lo, hi) if lo <= t <= hi]
        if len(ticks) >= enough:
            break
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(style))
    axis.set_minor_formatter(NullFormatter())


# -- variants and domains ------------------------------------------------------------------------------
def domain_panels(frame: pd.DataFrame, splits, what: str) -> list[str]:
    """The validation domains to draw, one panel each: `splits` (checked) or every one measured."""
    have = sorted(frame["split"].unique())
    if splits is None:
        return have
    missing = [s for s in splits if s not in have]
    if missing or not splits:
        raise ValueError(f"splits: {missing or splits} not measured for {what}; available: {have}")
    return list(splits)


def variant_colors(frame: pd.DataFrame) -> dict:
    """variant -> (colour, display label), colours in label order, so every panel agrees."""
    import seaborn as sns

    labels = frame.drop_duplicates("variant").assign(config=lambda f: display_labels(f)).set_index("variant")["config"]
    palette = sns.color_palette(n_colors=len(labels))
    return {v: (color, labels[v]) for color, v in zip(palette, sorted(labels.index, key=lambda v: labels[v]))}


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The PNG bytes of `fig`, for an `ipywidgets.Image` that a widget redraws (the section-6 run
    pickers of the spectral-radius notebook). (Redrawing into an
    `ipywidgets.Output` makes a headless run send on the kernel's shell channel while it waits
    for the cell's reply there, which can hang nbclient: jupyter/nbclient#312.)"""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
