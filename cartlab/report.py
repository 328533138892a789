"""`cartlab report STUDY`: execute the analysis notebooks on a study and render one report.

    cartlab report cpu-demo                 # the runs of ablations/cpu-demo.yaml in runs/results.db
    cartlab report paper-diagnostics --db lab.db
    cartlab report paper                    # the paper's published numbers alone (data/paper/)
    cartlab report variable_depth --partial # render a study whose runs are not all trained yet
    cartlab report cpu-demo --workers 1     # one analysis notebook at a time (default: up to 4)

A study's report opens with "k of n runs trained" and "What this study shows": each comparison
(CART vs Dense, each ablation, matched compute, loops past the trained R) on every validation
domain with its seed-noise interval and verdict (cartlab.analysis.findings), also stored in the
database's `findings` table. A study with runs missing is refused unless --partial is given, and
then every page carries a banner naming the missing runs.

writes reports/<study>/:
    index.html            the report notebook rendered by nbconvert, code hidden
    summary.md            what the study shows, the headline tables (gap, decomposition, fits) in
                          markdown, figure links
    figures/*.png         every figure, tables/*.csv every table
    notebooks/*.ipynb     the executed analysis notebooks (and their code-hidden .html)

Each analysis notebook (ANALYSES) takes the same parameters: `study`, `db`, `report_dir`. It
reads results through `load_results`, computes with `cartlab.analysis`, and hands every figure
and table to an `Outputs`, which displays it and, when `report_dir` is set, saves it and lists
it in `report_dir/sections/<notebook>.json`. The `report` notebook assembles those sections.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cartlab.provenance import code_version
from cartlab.tables import (figure_labels, format_value, markdown_table, show, show_table, styled,  # noqa: F401
                            tidy)

ANALYSES = ("scaling_fit", "scaling_law", "seed_noise", "screen_correlation", "spectral_radius",
            "gap_decomposition", "variable_R", "compute")
PAPER = "paper"


@dataclass
class Completeness:
    """Which runs of a study are trained: every (label, seed, run id) the study's YAML expands to,
    with its state in the database (completed, running, interrupted, failed, ... or absent)."""

    study: str
    expected: list[tuple[str, int, str]]
    states: dict[str, str]

    @property
    def missing(self) -> list[tuple[str, int, str]]:
        return [r for r in self.expected if self.states.get(r[2]) != "completed"]

    @property
    def complete(self) -> bool:
        return not self.missing

    def line(self) -> str:
        """`4 of 6 runs trained; missing: random_loops seed 1 (not started), ...`."""
        n, k = len(self.expected), len(self.expected) - len(self.missing)
        if not self.missing:
            return f"{k} of {n} runs trained: the study is complete."
        missing = ", ".join(f"{label} seed {seed} ({self.states.get(rid, 'not started')})"
                            for label, seed, rid in self.missing)
        return f"{k} of {n} runs trained; missing: {missing}."


def completeness(study: str, db: str | os.PathLike = "runs/results.db") -> Completeness:
    """The trained and missing runs of ablations/<study>.yaml in `db` (read-only; a missing
    database means no run is trained)."""
    from cartlab.results.db import ResultsDB
    from cartlab.studies import load_study

    s = load_study(study)
    expected = list({r.run_id: (r.label, r.seed, r.run_id) for r in s.expand()}.values())
    states: dict[str, str] = {}
    if Path(db).exists():
        handle = ResultsDB(db, readonly=True)
        try:
            runs = handle.frame("runs")
        finally:
            handle.close()
        states = dict(zip(runs.run_id, runs.status))
    return Completeness(s.name, expected, states)


class IncompleteStudy(ValueError):
    """A study whose runs are not all trained, rendered without --partial."""


def check_study_name(study: str) -> None:
    """An unknown study is one line listing the choices, `paper` among them (with a "did you
    mean" from `load_study` when a name is close); a traversal is refused there too."""
    from cartlab.config import ConfigError
    from cartlab.studies import load_study

    if study == PAPER:
        return
    try:
        load_study(study)
    except ConfigError as err:
        if "not found" in str(err) and not Path(study).suffix:
            raise ConfigError(f"{err}; or '{PAPER}' for the paper's published numbers", err.path, err.tail) from None
        raise


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

    def unavailable(self, text: str) -> None:
        """What this section cannot show for this study, in one line (e.g. "no scaling fit: needs
        runs at 3+ widths"). Shown in the notebook; the report collects a section's such lines at
        its end ("Not shown for this study") instead of opening a page with them."""
        from IPython.display import Markdown, display

        if self.dir:
            self.section["items"].append({"kind": "unavailable", "text": text})
            self._write()
        display(Markdown(f"*Not shown: {text}*"))

    def _add(self, kind: str, path: Path, caption: str, **extra) -> None:
        self.section["items"].append({"kind": kind, "path": str(path.relative_to(self.dir)), "caption": caption,
                                      **extra})
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


def shown_sections(sections: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(sections with something to show, each without its `unavailable` lines; (section title,
    line) for every `unavailable` line), so a report collects what it cannot show at its end."""
    shown, absent = [], []
    for sec in sections:
        items = [i for i in sec["items"] if i["kind"] != "unavailable"]
        absent += [(sec["title"], i["text"]) for i in sec["items"] if i["kind"] == "unavailable"]
        if items:
            shown.append({**sec, "items": items})
    return shown, absent


def absent_markdown(absent: list[tuple[str, str]]) -> str:
    """The closing "Not shown for this study" list, one line per section item ('' if none)."""
    if not absent:
        return ""
    return "\n".join(["## Not shown for this study", "",
                      *(f"- *{title}*: {text}" for title, text in absent), ""])


def summary_markdown(study: str, report_dir: str | os.PathLike, runs: pd.DataFrame) -> str:
    """summary.md: the banner of a partial report, what the study shows (shows.md), the runs, then
    every section's notes, tables (markdown) and figure links, then what it cannot show."""
    root = Path(report_dir)
    lines = [f"# cartlab report: {study}", ""]
    if (root / BANNER).is_file():
        lines += [f"> **{(root / BANNER).read_text(encoding='utf-8').strip()}**", ""]
    if (root / SHOWS).is_file():
        lines += [(root / SHOWS).read_text(encoding="utf-8"), ""]
    lines += [f"{len(runs)} runs; rendered {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    sections, absent = shown_sections(read_sections(root))
    for sec in sections:
        lines += [f"## {sec['title']}", ""]
        for item in sec["items"]:
            if item["kind"] == "note":
                lines += [item["text"], ""]
            elif item["kind"] == "table":
                table = markdown_table(pd.read_csv(root / item["path"]), item.get("digits", 3))
                lines += [f"**{item['caption']}**" if item["caption"] else "", "", table, ""]
            else:
                lines += [f"![{item['caption']}]({item['path']})", ""]
    lines.append(absent_markdown(absent))
    return "\n".join(lines)


SHOWS = "shows.md"
"""The "What this study shows" block `render` writes into the report folder (findings in words)."""
BANNER = "banner.txt"
"""The partial-report banner `render` writes into the report folder when runs are missing."""


def store_findings(study: str, db: str | os.PathLike, found, log=print) -> None:
    """Write `found` (a list of `Finding`) into the `findings` table of `db`, replacing the
    study's earlier ones. A database that cannot be written is said in one line, not fatal."""
    from dataclasses import asdict

    from cartlab.results.db import ResultsDB

    if not Path(db).exists():
        return
    try:
        handle = ResultsDB(db)
        try:
            handle.replace_findings(study, [asdict(f) for f in found], code_version())
        finally:
            handle.close()
    except (ValueError, OSError) as err:
        log(f"cartlab: findings not stored in {db}: {err}")


# JupyterLab's page without the scripts it fetches from a CDN (require.js for widgets, MathJax, mermaid):
# a report is read offline too, where they only fail (and log errors), and it draws no widget, TeX or diagram.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def html_beside(executed: Path, banner: str = "") -> Path:
    """An executed notebook's HTML page beside it (`to_html`)."""
    return to_html(executed, executed.with_suffix(".html"), banner)


def to_html(notebook: Path, output: Path, banner: str = "") -> Path:
    """Render an executed notebook to standalone HTML with the code cells hidden: images inline,
    nothing fetched from the network (OFFLINE_TEMPLATE); `banner` (a partial report's) opens the
    page."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[DictLoader({"cartlab-report.html.j2": OFFLINE_TEMPLATE})],
                            template_file="cartlab-report.html.j2", exclude_input=True,
                            exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_filename(str(notebook))
    if banner:
        import html

        div = (f'<div class="cartlab-banner" style="background:#fff3cd;border:2px solid #d39e00;padding:0.8em;'
               f'margin:0.5em;font-weight:bold">{html.escape(banner)}</div>')
        at = body.find(">", body.find("<body")) + 1
        body = body[:at] + div + body[at:]
    tmp = output.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, output)
    return output


def render(study: str, db: str | os.PathLike = "runs/results.db", reports_dir: str | os.PathLike = "reports",
           log=print, *, partial: bool = False, workers: int | None = None) -> Path:
    """Execute every analysis notebook and the report notebook for `study` (or "paper") into
    reports/<study>/ and render index.html and summary.md; returns the index path. The analysis
    notebooks run `workers` at a time (default: up to 4, one per CPU core; `execute_many`).

    A study with runs missing is refused (`IncompleteStudy`, naming them) unless `partial`: then
    every page opens with a banner saying which runs are missing. The findings of the study
    (`cartlab.analysis.findings`) open the report and summary.md ("What this study shows") and
    are stored in the database's `findings` table."""
    from cartlab.analysis.findings import shows_markdown
    from cartlab.analysis.study import study_findings
    from cartlab.notebooks import execute, execute_many

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")

    check_study_name(study)
    state = None if study == PAPER else completeness(study, db)
    if state is not None and not Path(db).exists():
        raise ValueError(f"db: {db} does not exist; {state.line()} Train the study first: cartlab ablate {study}")
    if state is not None and not state.complete and not partial:
        raise IncompleteStudy(f"study {state.study}: {state.line()} Train them (cartlab ablate {study}) or render "
                              f"what is there with --partial")
    res = load_results(study, db)  # fail here, with a clear message, before any kernel starts
    name = study if study == PAPER else state.study
    out = Path(reports_dir) / name
    for sub in ("sections", "figures", "tables"):  # a report is remade whole, never mixed with an older one
        for old in (out / sub).glob("*"):
            old.unlink()
    for old in (out / SHOWS, out / BANNER):
        old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    banner = "" if state is None or state.complete else f"Partial report: {state.line()}"
    if banner:
        (out / BANNER).write_text(banner + "\n", encoding="utf-8")
    found = [] if study == PAPER else study_findings(res)
    status = ("The paper's published numbers (seed means): the sections below show them; findings with seed noise "
              "need per-seed runs." if state is None else state.line())
    (out / SHOWS).write_text(shows_markdown(found, completeness=status), encoding="utf-8")
    if state is not None:
        store_findings(name, db, found, log)
    params = {"study": study, "db": str(db), "report_dir": str(out)}
    static = {"spectral_radius": {"interactive": False}}  # no widgets in a rendered page
    jobs = [{"name": nb, "output": out / "notebooks" / f"{nb}.ipynb", "parameters": {**params, **static.get(nb, {})}}
            for nb in ANALYSES]
    for nb, _, seconds in execute_many(jobs, workers, then=functools.partial(html_beside, banner=banner)):
        log(f"  {nb}: {seconds:.0f} s")
    report_nb = execute("report", out / "notebooks" / "report.ipynb", params)
    index = to_html(report_nb, out / "index.html", banner)
    (out / "summary.md").write_text(summary_markdown(name, out, res.runs), encoding="utf-8")
    return index


def register(subparsers) -> None:
    p = subparsers.add_parser("report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study under ablations/ (or a study YAML), or 'paper' for the published numbers "
                                 "(data/paper/)")
    p.add_argument("--db", default="runs/results.db", help="results database (default: runs/results.db)")
    p.add_argument("--reports-dir", default="reports", help="where reports go (default: reports)")
    p.add_argument("--partial", action="store_true",
                   help="render a study whose runs are not all trained (every page says which are missing); "
                        "without it such a study is refused")
    p.add_argument("--workers", type=int, default=None,
                   help="analysis notebooks executed at a time (default: up to 4, one per CPU core)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    index = render(args.study, args.db, args.reports_dir, partial=args.partial, workers=args.workers)
    print(f"cartlab: report in {index} ({time.time() - t0:.0f} s); summary in {index.with_name('summary.md')}")
    return 0
