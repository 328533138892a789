"""How a report shows numbers and figures: tables as a reader should see them (integers as
integers, no index, no empty columns, numbers to a fixed precision) in the notebook, its HTML and
summary.md, and what a figure says about itself (its title, its unlabelled axes).

    show_table(frame)           # in a notebook: styled, no index
    markdown_table(frame)       # the same cells for summary.md
    figure_labels(fig)          # {"title": ..., "unlabelled": [...]}: a figure reads alone when both are set
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def show(fig) -> bytes:
    """Display a matplotlib Figure in the notebook as a PNG and return the PNG bytes. (A Figure
    made outside pyplot has no inline display of its own.)"""
    import io

    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    display(Image(data=buf.getvalue()))
    return buf.getvalue()


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` as a reader should see it, values unrounded: a named index (e.g. d_model) becomes
    columns and an unnamed one is dropped; columns with no value at all are dropped; whole-number
    columns are integers (nullable Int64 where some are missing, so n_loops reads 3, not 3.0; a
    CSV read back or a column with NaN would otherwise be float); missing text is blank, not NaN.
    Whole-number column labels (a pivot over n_loops) read 2, not 2.0."""
    frame = frame.reset_index(drop=all(n is None for n in frame.index.names))
    frame = frame.rename(columns=_whole_label)
    out = {}
    for col, s in frame.items():
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            s = s.astype(object).where(s.notna(), "").map(_number_or_text)  # "0.902" read back from a CSV
            if (s.astype(str).str.strip() == "").all():
                continue
        elif s.notna().any():
            v = s.dropna().to_numpy(float)
            if np.isfinite(v).all() and (v == np.round(v)).all() and np.abs(v).max() < 2 ** 53:
                s = s.astype("Int64")
        else:
            continue
        out[col] = s
    return pd.DataFrame(out, index=frame.index)


def _number_or_text(value):
    """A number written as text (a CSV column mixing numbers and words, e.g. 0.902 and "no gate")
    as the number, so it is formatted like one; any other value unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and abs(number) < 2 ** 53 else number


def _whole_label(label):
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and label.endswith(".0") and label[:-2].lstrip("-").isdigit():
        return label[:-2]
    return label


def format_value(value, digits: int = 3) -> str:
    """One table cell: blank if missing; integers plain below 10^4 (widths, R), with thousands
    separators up to 10^10 (parameters, tokens), in e-notation beyond (FLOPs); floats with
    `digits` decimals between 10^-digits and 10^6, in e-notation with `digits` significant
    figures outside (a p-value of 4e-05, FLOPs)."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        value = int(value)
        return str(value) if abs(value) < 10_000 else f"{value:,}" if abs(value) < 10 ** 10 else f"{value:.4g}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if value == 0 or 10.0 ** -digits <= abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


def styled(frame: pd.DataFrame, digits: int = 3):
    """`tidy(frame)` as a pandas Styler for the notebook and its HTML: no index column, every
    cell through `format_value`, text columns (header and cells) left-aligned."""
    frame = tidy(frame)
    text = [i for i, c in enumerate(frame.columns) if not pd.api.types.is_numeric_dtype(frame[c])]
    return (frame.style.hide(axis="index").format(lambda v: format_value(v, digits))
            .set_table_styles([{"selector": f".col{i}", "props": "text-align: left"} for i in text]))


def show_table(frame: pd.DataFrame, digits: int = 3) -> None:
    """Display `frame` as `styled` shows it."""
    from IPython.display import display

    display(styled(frame, digits))


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """`tidy(frame)` as a markdown table (summary.md), cells as `format_value` writes them."""
    frame = tidy(frame)
    align = ["right" if pd.api.types.is_numeric_dtype(frame[c]) else "left" for c in frame.columns]
    cells = frame.astype(object).apply(lambda col: col.map(lambda v: format_value(v, digits)))
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)


def figure_labels(fig) -> dict:
    """What a figure says about itself in its PNG: `title` (its suptitle, or the title of its one
    plotted axes) and `unlabelled`, the plotted axes (by their title or position) missing an x or
    y label. A label on one of several axes sharing x (or y) counts for all of them, and a
    colorbar needs one label. A figure reads without the page around it when title is set and
    unlabelled is empty."""
    plotted = [ax for ax in fig.axes if ax.has_data()]
    panels = [ax for ax in plotted if not hasattr(ax, "_colorbar")]
    title = fig.get_suptitle() or (panels[0].get_title() if len(panels) == 1 else "")
    unlabelled = []
    for i, ax in enumerate(plotted):
        xs = ax.get_shared_x_axes().get_siblings(ax)
        ys = ax.get_shared_y_axes().get_siblings(ax)
        has_x, has_y = any(a.get_xlabel() for a in xs), any(a.get_ylabel() for a in ys)
        if hasattr(ax, "_colorbar"):  # a colorbar has one axis to name
            has_x = has_y = has_x or has_y
        for axis, ok in (("x", has_x), ("y", has_y)):
            if not ok:
                unlabelled.append(f"{ax.get_title() or f'axes {i}'}: no {axis} label")
    return {"title": title, "unlabelled": unlabelled}
