"""`cartlab report STUDY`: execute the analysis notebooks on a study and render one report.

    cartlab report cpu-demo                 # the runs of ablations/cpu-demo.yaml in runs/results.db
    cartlab report paper-diagnostics --db lab.db
    cartlab report paper                    # the paper's published numbers alone (data/paper/)

writes reports/<study>/:
    index.html            the report notebook rendered by nbconvert, code hidden
    summary.md            the headline tables (gap, decomposition, fits) in markdown, figure links
    figures/*.png         every figure, tables/*.csv every table
    notebooks/*.ipynb     the executed analysis notebooks (and their code-hidden .html)

Each analysis notebook (ANALYSES) takes the same parameters: `study`, `db`, `report_dir`. It
reads results through `load_results`, computes with `cartlab.analysis`, and hands every figure
and table to an `Outputs`, which displays it and, when `report_dir` is set, saves it and lists
it in `report_dir/sections/<notebook>.json`. The `report` notebook assembles those sections.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

ANALYSES = ("scaling_fit", "scaling_law", "seed_noise", "screen_correlation", "spectral_radius",
            "gap_decomposition", "variable_R", "compute")
PAPER = "paper"


def load_results(study: str, db: str | os.PathLike = "runs/results.db"):
    """The results of `study` as a `cartlab.analysis.schema.Results`: for "paper" the published
    tables (data/paper/), else the completed runs of ablations/<study>.yaml found in `db`."""
    from cartlab.analysis.published import load_published
    from cartlab.analysis.schema import Results
    from cartlab import results

    if study == PAPER:
        return load_published()
    from cartlab.studies import load_study

    ids = {r.run_id for r in load_study(study).expand()}  # an unknown study is named before the db
    if not Path(db).exists():
        raise ValueError(f"db: {db} does not exist; train the study first (cartlab ablate {study})")
    runs = results.runs(db)
    runs = runs[runs.run_id.isin(ids) & (runs.status == "completed")].reset_index(drop=True)
    if runs.empty:
        raise ValueError(f"study: no completed run of {study!r} in {db}; run `cartlab ablate {study}` first")
    keep = list(runs.run_id)
    return Results(runs, results.train_log(db, keep), results.eval_log(db, keep), results.downstream(db, keep),
                   results.probes(db, keep))


def default_split(eval_log: pd.DataFrame) -> str:
    """The validation split analyses compare on: the paper's headline Wikipedia split when
    present, else the embedded corpus's prose split, else the first one."""
    splits = sorted(eval_log["split"].unique())
    if not splits:
        raise ValueError("eval_log: no evaluations; the runs have not reached their first eval step")
    for preferred in ("wiki", "prose"):
        if preferred in splits:
            return preferred
    return splits[0]


def run_overview(study: str, res) -> pd.DataFrame:
    """One row per run: its label in the study (its name for the paper), configuration, seed,
    parameters, training tokens and final validation perplexity per split. (Every run shown is
    completed, or published for the paper: load_results keeps no other.)"""
    from cartlab.analysis.schema import config_label, final_eval

    runs = res.runs.copy()
    labels = {}
    if study != PAPER:
        from cartlab.studies import load_study

        labels = {r.run_id: r.label for r in load_study(study).expand()}
    runs["label"] = [labels.get(rid, name) for rid, name in zip(runs.run_id, runs.name)]
    runs["config"] = runs.apply(config_label, axis=1)
    ppl = final_eval(res.runs, res.eval_log).pivot_table(index="run_id", columns="split", values="ppl")
    ppl.columns = [f"ppl {c}" for c in ppl.columns]
    cols = ["label", "config", "seed", "n_seeds", "stage", "stored_params", "effective_params", "tokens"]
    return runs.set_index("run_id")[cols].join(ppl).reset_index(drop=True)


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


class Outputs:
    """Figures and tables of one analysis notebook: each is displayed in the notebook and, when
    `report_dir` is given, saved (figures/NAME.png, tables/NAME.csv) and listed in order in
    `report_dir/sections/<notebook>.json` for the report to assemble."""

    def __init__(self, report_dir: str | os.PathLike, notebook: str, title: str):
        self.dir = Path(report_dir) if report_dir else None
        self.section = {"notebook": notebook, "title": title, "items": []}
        if self.dir:
            for sub in ("figures", "tables", "sections"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            self._write()

    def figure(self, fig, name: str, caption: str = "") -> None:
        """Show `fig` (a matplotlib Figure) as a PNG; save it as figures/<notebook>-NAME.png and
        list it with its title and unlabelled axes (`figure_labels`), which should be none."""
        png = show(fig)
        if self.dir:
            path = self.dir / "figures" / f"{self.section['notebook']}-{name}.png"
            path.write_bytes(png)
            self._add("figure", path, caption, **figure_labels(fig))

    def table(self, frame: pd.DataFrame, name: str, caption: str = "", digits: int = 3) -> pd.DataFrame:
        """Show `frame` as `styled` does (no index, integers as integers, no empty columns, numbers
        to `digits`); save it whole as tables/<notebook>-NAME.csv, full precision. A named index
        (e.g. d_model) is kept as columns, an unnamed one dropped. Returns the saved frame."""
        frame = frame.reset_index(drop=all(n is None for n in frame.index.names))
        if self.dir:
            path = self.dir / "tables" / f"{self.section['notebook']}-{name}.csv"
            frame.to_csv(path, index=False)
            self._add("table", path, caption, digits=digits)
        show_table(frame, digits)
        return frame

    def note(self, text: str) -> None:
        """A finding in words (shown, and carried into the report and summary)."""
        from IPython.display import Markdown, display

        if self.dir:
            self.section["items"].append({"kind": "note", "text": text})
            self._write()
        display(Markdown(text))

    def _add(self, kind: str, path: Path, caption: str, **extra) -> None:
        self.section["items"].append({"kind": kind, "path": str(path.relative_to(self.dir)), "caption": caption,
                                      **extra})
        self._write()

    def _write(self) -> None:
        path = self.dir / "sections" / f"{self.section['notebook']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.section, indent=1))
        os.replace(tmp, path)


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


def read_sections(report_dir: str | os.PathLike) -> list[dict]:
    """The sections the analysis notebooks left in `report_dir`, in ANALYSES order."""
    root = Path(report_dir) / "sections"
    return [json.loads((root / f"{name}.json").read_text()) for name in ANALYSES if (root / f"{name}.json").is_file()]


def summary_markdown(study: str, report_dir: str | os.PathLike, runs: pd.DataFrame) -> str:
    """summary.md: the runs, then every section's notes, tables (markdown) and figure links."""
    root = Path(report_dir)
    lines = [f"# cartlab report: {study}", "", f"{len(runs)} runs; rendered {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    for sec in read_sections(root):
        lines += [f"## {sec['title']}", ""]
        for item in sec["items"]:
            if item["kind"] == "note":
                lines += [item["text"], ""]
            elif item["kind"] == "table":
                table = markdown_table(pd.read_csv(root / item["path"]), item.get("digits", 3))
                lines += [f"**{item['caption']}**" if item["caption"] else "", "", table, ""]
            else:
                lines += [f"![{item['caption']}]({item['path']})", ""]
    return "\n".join(lines)


# JupyterLab's page without the scripts it fetches from a CDN (require.js for widgets, MathJax, mermaid):
# a report is read offline too, where they only fail (and log errors), and it draws no widget, TeX or diagram.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def to_html(notebook: Path, output: Path) -> Path:
    """Render an executed notebook to standalone HTML with the code cells hidden: images inline,
    nothing fetched from the network (OFFLINE_TEMPLATE)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[DictLoader({"cartlab-report.html.j2": OFFLINE_TEMPLATE})],
                            template_file="cartlab-report.html.j2", exclude_input=True,
                            exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_filename(str(notebook))
    tmp = output.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, output)
    return output


def render(study: str, db: str | os.PathLike = "runs/results.db", reports_dir: str | os.PathLike = "reports",
           log=print) -> Path:
    """Execute every analysis notebook and the report notebook for `study` (or "paper") into
    reports/<study>/ and render index.html and summary.md; returns the index path."""
    from cartlab.notebooks import execute
    from cartlab.studies import load_study

    res = load_results(study, db)  # fail here, with a clear message, before any kernel starts
    name = study if study == PAPER else load_study(study).name
    out = Path(reports_dir) / name
    for sub in ("sections", "figures", "tables"):  # a report is remade whole, never mixed with an older one
        for old in (out / sub).glob("*"):
            old.unlink()
    params = {"study": study, "db": str(db), "report_dir": str(out)}
    static = {"spectral_radius": {"interactive": False}}  # no widgets in a rendered page
    for nb in ANALYSES:
        t0 = time.time()
        executed = execute(nb, out / "notebooks" / f"{nb}.ipynb", {**params, **static.get(nb, {})})
        to_html(executed, executed.with_suffix(".html"))
        log(f"  {nb}: {time.time() - t0:.0f} s")
    report_nb = execute("report", out / "notebooks" / "report.ipynb", params)
    index = to_html(report_nb, out / "index.html")
    (out / "summary.md").write_text(summary_markdown(name, out, res.runs), encoding="utf-8")
    return index


def register(subparsers) -> None:
    p = subparsers.add_parser("report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study under ablations/ (or a study YAML), or 'paper' for the published numbers")
    p.add_argument("--db", default="runs/results.db", help="results database (default: runs/results.db)")
    p.add_argument("--reports-dir", default="reports", help="where reports go (default: reports)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    index = render(args.study, args.db, args.reports_dir)
    print(f"cartlab: report in {index} ({time.time() - t0:.0f} s); summary in {index.with_name('summary.md')}")
    return 0
