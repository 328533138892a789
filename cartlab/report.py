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

import pandas as pd

ANALYSES = ("scaling_fit", "seed_noise", "screen_correlation", "spectral_radius", "gap_decomposition", "variable_R")
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
    parameters, status and final validation perplexity per split."""
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
    cols = ["label", "config", "seed", "n_seeds", "stage", "stored_params", "effective_params", "status"]
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
        """Show `fig` (a matplotlib Figure) as a PNG; save it as figures/<notebook>-NAME.png."""
        png = show(fig)
        if self.dir:
            path = self.dir / "figures" / f"{self.section['notebook']}-{name}.png"
            path.write_bytes(png)
            self._add("figure", path, caption)

    def table(self, frame: pd.DataFrame, name: str, caption: str = "", digits: int = 3) -> pd.DataFrame:
        """Show `frame` rounded to `digits`; save it as tables/<notebook>-NAME.csv (full precision).
        A named index (e.g. d_model) is kept as columns, an unnamed one dropped."""
        from IPython.display import display

        if any(n is not None for n in frame.index.names):  # a meaningful index (e.g. d_model) becomes columns
            frame = frame.reset_index()
        else:
            frame = frame.reset_index(drop=True)
        if self.dir:
            path = self.dir / "tables" / f"{self.section['notebook']}-{name}.csv"
            frame.to_csv(path, index=False)
            self._add("table", path, caption)
        display(frame.round(digits))
        return frame

    def note(self, text: str) -> None:
        """A finding in words (shown, and carried into the report and summary)."""
        from IPython.display import Markdown, display

        if self.dir:
            self.section["items"].append({"kind": "note", "text": text})
            self._write()
        display(Markdown(text))

    def _add(self, kind: str, path: Path, caption: str) -> None:
        self.section["items"].append({"kind": kind, "path": str(path.relative_to(self.dir)), "caption": caption})
        self._write()

    def _write(self) -> None:
        path = self.dir / "sections" / f"{self.section['notebook']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.section, indent=1))
        os.replace(tmp, path)


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
                frame = pd.read_csv(root / item["path"])
                frame = frame.astype(object).where(frame.notna(), "")  # blank, not "nan"
                lines += [f"**{item['caption']}**" if item["caption"] else "", "",
                          frame.to_markdown(index=False, floatfmt=".4g"), ""]
            else:
                lines += [f"![{item['caption']}]({item['path']})", ""]
    return "\n".join(lines)


def to_html(notebook: Path, output: Path) -> Path:
    """Render an executed notebook to standalone HTML with the code cells hidden."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
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
