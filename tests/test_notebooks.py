"""The notebooks end to end: `cartlab ablate` executes train_variant per run (and, killed in the
middle, redoes only the unfinished runs), `cartlab report` executes every analysis notebook on
the results and renders the HTML report, for a study of tiny runs and for the paper's numbers.
Every notebook runs headlessly through papermill here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import nbformat
import pytest

from cartlab.notebooks import list_notebooks, notebook_path
from cartlab import results
from cartlab.report import ANALYSES
from conftest import db_rows as _db_rows

pytestmark = pytest.mark.slow

ALL_NOTEBOOKS = {"train_variant", *ANALYSES, "report"}


def _parameters_cell(name: str):
    nb = nbformat.read(notebook_path(name), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: exactly one cell tagged parameters"
    return nb, cells[0]


def test_the_issue_notebooks_exist_unexecuted():
    assert set(list_notebooks()) == ALL_NOTEBOOKS
    for name in ALL_NOTEBOOKS:
        nb, _ = _parameters_cell(name)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} has outputs in git"


@pytest.mark.parametrize("name", sorted(ALL_NOTEBOOKS))
def test_help_notebook_lists_every_parameter_with_its_help(name):
    _, cell = _parameters_cell(name)
    declared = {}
    for line in cell.source.splitlines():
        assignment, _, comment = line.partition("#")
        var = assignment.split(":")[0].split("=")[0].strip()
        assert var and comment.strip(), f"{name}: parameter line without a help comment: {line!r}"
        declared[var] = comment.strip()
    help_text = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(notebook_path(name))],
                               capture_output=True, text=True, check=True).stdout
    # one entry per parameter: "  name: type (default ...)  help", the help possibly on the next line
    entries = {}
    for line in help_text.split("inferred for notebook", 1)[1].splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   ") and ":" in line:
            current = line.strip().split(":")[0]
            entries[current] = line
        elif line.strip():
            entries[current] += " " + line.strip()
    assert set(entries) == set(declared), f"{name}: papermill lists {sorted(entries)}"
    for var, comment in declared.items():
        assert comment in entries[var], f"{name}: help of {var} lost: {entries[var]!r}"


@pytest.mark.parametrize("name", sorted(ALL_NOTEBOOKS))
def test_every_notebook_checks_its_parameters_before_any_work(name):
    """The first code cell after `parameters` calls check_parameters(globals()) before anything
    but its own import (papermill runs its injected cell in between)."""
    nb, cell = _parameters_cell(name)
    after = nb.cells[nb.cells.index(cell) + 1:]
    first = next(c for c in after if c.cell_type == "code").source.splitlines()
    assert first[0] == "from cartlab.notebooks import check_parameters, work_from_project_root", first[0]
    assert first[1].startswith("check_parameters(globals())"), first[1]


def test_check_parameters_reads_what_papermill_injected():
    from cartlab.notebooks import check_parameters

    params = 'config_yaml: str = ""  # yaml\noverrides: str = ""  # extra\n'
    check_parameters({"_ih": ["", params, "check_parameters(globals())"]})  # nothing injected
    check_parameters({"_ih": ["", params, '# Parameters\noverrides = "steps=2"\n', "check..."]})
    with pytest.raises(ValueError) as err:
        check_parameters({"_ih": ["", params, '# Parameters\noverides = "steps=2"\nlabel = 1\n', "check..."]})
    assert str(err.value) == ("notebook parameter 'overides' is not one this notebook takes (did you mean "
                              "'overrides'?) (also unknown: label); allowed: config_yaml, overrides")
    check_parameters({})  # run by hand outside IPython: nothing to check


def test_execute_refuses_an_unknown_parameter_before_a_kernel_starts(tmp_path):
    from cartlab.notebooks import execute

    t0 = time.time()
    with pytest.raises(ValueError, match=r"^notebook parameter 'overides' is not one notebooks/train_variant.ipynb "
                                         r"takes \(did you mean 'overrides'\?\); allowed: config_yaml, label, "
                                         r"overrides, study$"):
        execute("train_variant", tmp_path / "out.ipynb", {"overides": "steps=2"})
    assert time.time() - t0 < 5 and list(tmp_path.iterdir()) == []


def test_headless_kernels_shut_down_without_the_interrupt_that_logs_an_error(monkeypatch):
    """jupyter_client sends SIGINT before every shutdown, which ipykernel can log as "ERROR |
    KeyboardInterrupt caught in kernel." once the notebook is done: `execute`'s kernel manager
    skips that interrupt while shutting down, interrupts otherwise, and still shuts the kernel
    down and removes its connection file."""
    import asyncio

    from jupyter_client.manager import KernelManager

    from cartlab.notebooks import kernel_manager

    sent = []

    async def interrupt(self):
        sent.append(self.shutting_down)

    with monkeypatch.context() as patch:
        patch.setattr(KernelManager, "_async_interrupt_kernel", interrupt)
        km = kernel_manager()()
        asyncio.run(km._async_interrupt_kernel())  # a cell timeout: interrupted
        km.shutting_down = True
        asyncio.run(km._async_interrupt_kernel())  # shutting down: not
    assert sent == [False]

    async def start_and_stop():
        km = kernel_manager()(kernel_name="python3")
        await km.start_kernel(extra_arguments=["--IPKernelApp.log_level=ERROR"])
        connection = km.connection_file
        assert await km.is_alive() and os.path.exists(connection)
        await km.shutdown_kernel()
        return await km.is_alive(), os.path.exists(connection)

    assert asyncio.run(start_and_stop()) == (False, False)


def test_plain_papermill_refuses_an_unknown_parameter_before_training(tmp_path):
    """`papermill notebooks/train_variant.ipynb out.ipynb -p overides ...` only warns by itself
    and would train the default run; the notebook's own check stops it in its first cell."""
    proc = subprocess.run([sys.executable, "-m", "papermill", str(notebook_path("train_variant")), "out.ipynb",
                           "-p", "overides", "steps=2", "-k", "python3"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode != 0
    assert ("ValueError: notebook parameter 'overides' is not one this notebook takes (did you mean "
            "'overrides'?); allowed: config_yaml, label, overrides, study") in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing trained
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    ran = [c for c in out.cells if c.cell_type == "code" and c.get("execution_count")]
    assert len(ran) == 3  # parameters, injected parameters, the check


def test_ablate_after_a_kill_redoes_only_unfinished_runs(tiny_study):
    after_kill, executed = tiny_study["after_kill"], tiny_study["executed"]
    done = {rid for rid, status in after_kill.items() if status == "completed"}
    assert 1 <= len(done) < 5, f"the kill should land mid-study: {after_kill}"
    runs_dir = tiny_study["reports"] / "tiny" / "runs"
    for rid in done:  # finished runs are not re-executed: their notebook is not rewritten
        nb = f"{rid}.ipynb"
        if nb in executed:
            assert (runs_dir / nb).stat().st_mtime_ns == executed[nb]
        # (killed after training but while its notebook was being written: the notebook is redone)
    log = tiny_study["rerun_log"]
    assert f"{len(done)} already completed, {5 - len(done)} to train" in log
    assert f": {5 - len(done)} trained, " in log and f"cartlab: next: cartlab report {tiny_study['study']}" in log
    assert "without encryption" not in log  # the kernel start-up warning is silenced
    assert any(f"{rid}.ipynb" in executed for rid in done) or "without their notebook" in tiny_study["rerun_log"]
    statuses = _db_rows(tiny_study["db"], "SELECT status FROM runs")
    assert [s for (s,) in statuses] == ["completed"] * 5
    assert len(list(runs_dir.glob("*.ipynb"))) == 5 and not list(runs_dir.glob(".*partial*"))
    # the run that was killed resumed from its checkpoint: one log row per step, none duplicated
    dup = _db_rows(tiny_study["db"], "SELECT run_id, step, count(*) FROM train_log GROUP BY run_id, step HAVING count(*) > 1")
    assert dup == []
    steps = _db_rows(tiny_study["db"], "SELECT run_id, max(step) FROM train_log GROUP BY run_id")
    assert {s for _, s in steps} == {24}


def test_ablate_list_shows_final_validation_losses(tiny_study, capsys):
    from cartlab import cli

    assert cli.main(["ablate", str(tiny_study["study"]), "--db", str(tiny_study["db"]), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("completed") and " val " in line for line in lines)
    assert all("prose " in line for line in lines)


def test_train_variant_notebook_shows_the_runs_figures(tiny_study):
    nb = nbformat.read(next((tiny_study["reports"] / "tiny" / "runs").glob("cart-*.ipynb")), as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # loss curve and spectral radius


def test_report_renders_the_study_with_loss_radius_gap_and_decomposition(tiny_study, tiny_report):
    index = tiny_report
    out = index.parent
    assert index == tiny_study["reports"] / "tiny" / "index.html"
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"seed_noise-train-loss.png", "seed_noise-val-ppl.png", "spectral_radius-trajectories.png"} <= figures
    assert any(f.startswith("gap_decomposition-waterfall-effective") for f in figures)
    tables = {p.name for p in (out / "tables").glob("*.csv")}
    assert "gap_decomposition-gaps.csv" in tables and any(t.startswith("gap_decomposition-decomposition") for t in tables)
    for name in ANALYSES:
        assert (out / "notebooks" / f"{name}.html").is_file()
    html = index.read_text()
    assert html.count("<img") >= len(figures)  # every figure embedded in the report
    radius_nb = (out / "notebooks" / "spectral_radius.ipynb").read_text()
    assert "widget-view" not in radius_nb  # the report's radius notebook is static
    assert "load_results(" not in html  # code hidden
    summary = (out / "summary.md").read_text()
    for needle in ("CART-Dense gap", "unattributed (includes", "lti_gate", "Seed noise"):
        assert needle in summary
    # what the study shows comes first, complete, per domain, and is stored with the code version
    assert summary.index("## What this study shows") < summary.index("## Seed noise")
    assert "5 of 5 runs trained: the study is complete." in summary and "Partial report" not in summary
    assert "What this study shows" in html and html.index("What this study shows") < html.index("Seed noise")
    stored = results.findings(tiny_study["db"], "tiny")
    domains = set(results.eval_log(tiny_study["db"]).split)
    gap = stored[stored.analysis == "gap"]
    assert len(gap) and all(set(g.split) == domains for _, g in gap.groupby("claim"))  # every domain
    assert set(stored.verdict) <= {"signal", "within noise", "not enough seeds", "not measured"}
    assert set(stored[stored.analysis == "ablation"].verdict) <= {"not enough seeds", "not measured"}  # one seed
    decomposition = next((out / "tables").glob("gap_decomposition-decomposition*.csv")).read_text()
    assert "signal" in decomposition or "within noise" in decomposition


def test_spectral_radius_builds_its_run_picker_when_interactive(tiny_study, tmp_path, repo):
    """As in JupyterLab: the kernel starts in notebooks/ and db is a path relative to the
    repository root (where `cartlab` commands run), and the widgets are built."""
    from cartlab.notebooks import execute, notebooks_dir

    db = os.path.relpath(tiny_study["db"], repo)
    out = execute("spectral_radius", tmp_path / "sr.ipynb",
                  {"study": str(tiny_study["study"]), "db": db, "interactive": True}, cwd=notebooks_dir())
    nb = nbformat.read(out, as_version=4)
    widget_outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widget_outputs) == 3  # the run picker and the figure area it redraws; the loop-measure explorer


def assert_paper_report(index, repo):
    """The paper report (`cartlab report paper`) at `index` shows both stages' scaling fits, the
    radius table as Table 8 cell for cell, and the R reversal. Checked on the report the
    installed package renders (tests/test_install.py), which runs every paper notebook."""
    out = index.parent
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"scaling_fit-stage1.png", "scaling_fit-stage2.png", "screen_correlation-reversal.png"} <= figures
    sections = {s["notebook"]: s for s in (json.loads(p.read_text()) for p in (out / "sections").glob("*.json"))}
    notes = " ".join(i["text"] for i in sections["spectral_radius"]["items"] if i["kind"] == "note")
    assert "**stage2**: rho in [0.790, 0.830]; rises with width at every R: True; rises with R at every width: True" in notes
    import pandas as pd  # the radius table of the report is Table 8, cell for cell

    shown = pd.read_csv(out / "tables" / "spectral_radius-stage2-radius.csv").set_index("d_model")
    table8 = pd.read_csv(repo / "data" / "paper" / "table8_spectral_radius.csv").pivot(
        index="d_model", columns="n_loops", values="spectral_radius_3seed_mean_step30500")
    shown.columns = shown.columns.astype(int)
    pd.testing.assert_frame_equal(shown, table8, check_names=False, check_exact=False, atol=1e-9)
    scaling_notes = " ".join(i["text"] for i in sections["scaling_fit"]["items"] if i["kind"] == "note")
    assert "segment exponents -0.60, -0.42, -0.40" in scaling_notes
    reversal = " ".join(i["text"] for i in sections["screen_correlation"]["items"] if i["kind"] == "note")
    assert "At every width the screen picks a different best R" in reversal
    items = sections["scaling_law"]["items"]  # no joint law without per-run configs: one line, no paragraph
    assert len(items) == 1 and items[0]["kind"] == "unavailable", items
    assert items[0]["text"].startswith("No joint law for `paper`") and "config_json" in items[0]["text"]
    html = index.read_text()
    assert html.count("<img") >= 3 and "Spectral radius" in html and "Scaling with width" in html


def test_report_of_an_untrained_study_says_what_to_run(tmp_path, capsys):
    from cartlab.cli import main

    assert main(["report", "cpu-demo", "--db", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err
    assert "cartlab ablate cpu-demo" in err and "0 of 8 runs trained; missing: baseline seed 1 (not started)" in err
    assert not (tmp_path / "none.db").exists()


def test_a_study_with_runs_missing_is_refused_and_renders_with_a_banner_when_partial(tiny_study, tmp_path, capsys,
                                                                                     monkeypatch):
    """The tiny study's runs plus one never trained: refused in one line naming it; with
    --partial, every page (index, each analysis notebook, summary.md) opens with the banner.
    Two analyses stand for all of them (`render` gives every page the same banner; the whole
    report renders in test_report_renders_the_study_...)."""
    import yaml

    from cartlab import report
    from cartlab.cli import main

    monkeypatch.setattr(report, "ANALYSES", ("seed_noise", "compute"))

    spec = yaml.safe_load(tiny_study["study"].read_text())
    spec["name"] = "tiny-partial"
    spec["runs"].append({"label": "no_hyper", "hooks": ["no_hyper"]})
    study = tmp_path / "tiny-partial.yaml"
    study.write_text(yaml.safe_dump(spec))
    args = ["report", str(study), "--db", str(tiny_study["db"]), "--reports-dir", str(tmp_path / "reports")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "5 of 6 runs trained; missing: no_hyper seed 1 (not started)" in err
    assert "--partial" in err and not (tmp_path / "reports").exists()
    assert main([*args, "--partial"]) == 0
    out = tmp_path / "reports" / "tiny-partial"
    banner = "Partial report: 5 of 6 runs trained; missing: no_hyper seed 1 (not started)."
    pages = [out / "index.html", *(out / "notebooks").glob("*.html")]
    assert len(pages) == len(report.ANALYSES) + 1
    for page in pages:
        assert banner in page.read_text(), page.name
    assert (out / "summary.md").read_text().startswith(f"# cartlab report: tiny-partial\n\n> **{banner}**")


def test_variable_depth_without_its_runs_exits_non_zero_naming_them(tmp_path, capsys):
    from cartlab.cli import main

    assert main(["report", "variable_depth", "--db", str(tmp_path / "none.db")]) != 0
    assert "0 of 6 runs trained; missing: fixed-R seed 1 (not started)" in capsys.readouterr().err


def test_report_workers_below_one_are_refused_before_anything_runs(tmp_path, capsys):
    from cartlab.cli import main

    assert main(["report", "paper", "--workers", "0", "--reports-dir", str(tmp_path / "r")]) == 2
    assert "--workers: must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_an_unknown_study_offers_the_closest_name_and_paper(capsys):
    from cartlab.cli import main

    assert main(["report", "variable-depth"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'variable_depth'?" in err and "or 'paper' for the paper's published numbers" in err
