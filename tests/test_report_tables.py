"""What a report shows a reader (issue 18), without a browser: tables without the pandas index,
integers as integers, no empty columns, blanks rather than NaN, the CSV at full precision; and
every plot function's figure titled with labelled axes, read back by `report.figure_labels`.
The browser half is tests/test_report_browser.py.

    python -m pytest -q tests/test_report_tables.py
"""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cartlab.analysis import plots, published  # noqa: E402
from cartlab.analysis.synthetic import eval_rows, run_row, train_curves  # noqa: E402
from cartlab.report import Outputs, figure_labels, format_value, markdown_table, read_sections, tidy  # noqa: E402


def gap_like() -> pd.DataFrame:
    """What the issue saw: a float R with a NaN (a Dense row), whole-number floats, a column with
    no value, a text column of NaN and blanks, a text column with one NaN, an unnamed index."""
    return pd.DataFrame({"split": ["prose", "wiki"], "n_loops": [3.0, np.nan], "tokens": [14_400_000.0] * 2,
                         "dense_stored": [np.nan, np.nan], "note": [np.nan, ""], "run": ["dense-d128", None],
                         "ppl": [6.137123, 41.5], "p": [4.2e-05, 0.5]}, index=[7, 3])


def test_tidy_keeps_values_and_drops_what_a_reader_should_not_see():
    t = tidy(gap_like())
    assert list(t.columns) == ["split", "n_loops", "tokens", "run", "ppl", "p"]  # no index, no empty column
    assert list(t.index) == [0, 1]
    assert str(t.n_loops.dtype) == "Int64" and t.n_loops.iloc[0] == 3 and t.n_loops.isna().iloc[1]
    assert str(t.tokens.dtype) == "Int64"
    assert list(t.run) == ["dense-d128", ""]
    assert t.ppl.iloc[0] == 6.137123  # not rounded: rounding is the display's
    named = tidy(pd.DataFrame({2.0: [0.8], 4.0: [0.9]}, index=pd.Index([128], name="d_model")))
    assert list(named.columns) == ["d_model", 2, 4]  # a meaningful index becomes a column, R labels whole
    mixed = tidy(pd.DataFrame({"gate radius": ["0.9020100831985474", "no gate", "3"]}))  # a CSV read back
    assert list(mixed["gate radius"]) == [0.9020100831985474, "no gate", 3]  # numbers, formatted as numbers


@pytest.mark.parametrize("value, text", [
    (3, "3"), (1024, "1024"), (14_400_000, "14,400,000"), (12_000_000_000_000, "1.2e+13"), (6.137123, "6.137"),
    (4.2e-05, "4.2e-05"), (0.0, "0.000"), (2.5e7, "2.5e+07"), (np.nan, ""), (None, ""), (pd.NA, ""), (True, "True"),
    ("within noise", "within noise"),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_outputs_table_saves_full_precision_and_the_markdown_reads_like_the_page(tmp_path):
    out = Outputs(tmp_path, "gap_decomposition", "Gap")
    out.table(gap_like(), "gaps", "gaps", digits=2)
    csv = pd.read_csv(tmp_path / "tables" / "gap_decomposition-gaps.csv")
    assert csv.ppl.iloc[0] == 6.137123 and "dense_stored" in csv.columns  # the CSV keeps everything
    item = read_sections(tmp_path)[0]["items"][0]
    assert item["digits"] == 2
    md = markdown_table(csv, item["digits"])
    header, _, first, second = md.splitlines()
    assert header.split("|")[1].strip() == "split" and "dense_stored" not in header and "note" not in header
    assert [c.strip() for c in first.split("|")[1:-1]] == ["prose", "3", "14,400,000", "dense-d128", "6.14", "4.2e-05"]
    assert [c.strip() for c in second.split("|")[1:-1]] == ["wiki", "", "14,400,000", "", "41.50", "0.50"]
    assert "nan" not in md.lower()


def test_figure_labels_names_what_a_figure_lacks():
    fig = Figure()
    left, right = fig.subplots(1, 2, sharey=True)
    left.plot([1, 2])
    right.plot([1, 2])
    left.set(xlabel="step", ylabel="loss")
    assert figure_labels(fig) == {"title": "", "unlabelled": ["axes 1: no x label"]}  # y is shared, x is not
    right.set_xlabel("step")
    fig.suptitle("Loss")
    assert figure_labels(fig) == {"title": "Loss", "unlabelled": []}
    single = Figure()
    ax = single.subplots()
    single.colorbar(ax.imshow(np.eye(2)))
    ax.set(title="radius", xlabel="R", ylabel="d")
    assert figure_labels(single) == {"title": "radius", "unlabelled": ["axes 1: no x label", "axes 1: no y label"]}


def _curves():
    runs = pd.DataFrame([run_row(f"b{s}", seed=s, d_model=128) for s in range(2)]
                        + [run_row("u", hooks="unshare_core", d_model=128)])
    steps = np.arange(0, 100, 10)
    log = train_curves(runs.run_id, steps, loss=lambda t: 3 + 5 / (1 + t / 10), rho=lambda t: 0.8 + 0 * t)
    log = log.assign(lr=lambda f: 1e-3 * np.minimum(1, (f.step + 1) / 20), grad_norm=2.0, tokens_per_s=1000.0)
    ev = pd.concat([eval_rows({r: {"prose": 50 - s / 5, "stories": 30 - s / 5} for r in runs.run_id}, step=s)
                    for s in steps])
    return runs, log, ev


def test_every_report_plot_has_a_title_and_labelled_axes():
    runs, log, ev = _curves()
    res = published.load_published()
    stage2 = res.runs[res.runs.hooks.fillna("") == ""]
    store = pd.DataFrame([run_row(f"b{s}", seed=s, stored_params=125e6, effective_params=179e6) for s in range(3)]
                         + [run_row("z", hooks="unshare_core"),
                            run_row("d", model="dense", n_layers=12, stored_params=180e6, effective_params=180e6)])
    store_ev = eval_rows({"b0": {"wiki": 19.9}, "b1": {"wiki": 20.0}, "b2": {"wiki": 20.1}, "z": {"wiki": 19.0},
                          "d": {"wiki": 18.5}}, step=100)
    figures = {
        "loss": plots.plot_loss_curves(runs, log),
        "val": plots.plot_loss_curves(runs, ev, value="ppl", split="prose"),
        "every domain": plots.plot_validation_curves(runs, ev),
        "dynamics": plots.plot_train_dynamics(runs, log),
        "radius": plots.plot_radius_trajectories(runs, log),
        "waterfall": plots.plot_gap_waterfall(store, store_ev, cart={"d_model": 1024, "n_loops": 6}),
        "fit": plots.plot_scaling_fit(stage2, res.eval_log, where={"stage": "stage2", "n_loops": 6,
                                                                   "prelude_layers": 6}),
        "all fits": plots.plot_scaling_groups(stage2, res.eval_log),
        "reversal": plots.plot_r_reversal(stage2, res.eval_log, where={"prelude_layers": 6}),
        "variable R": plots.plot_variable_r_profile(res.downstream, res.runs),
    }
    for name, fig in figures.items():
        labels = figure_labels(fig)
        assert labels["title"] and labels["unlabelled"] == [], (name, labels)


def test_validation_curves_and_dynamics_draw_a_panel_per_domain_and_per_logged_column():
    runs, log, ev = _curves()
    fig = plots.plot_validation_curves(runs, ev)
    assert [ax.get_title() for ax in fig.axes] == ["prose", "stories"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert len(fig.legends[0].get_texts()) == 2  # baseline (two seeds, one line) and unshare_core
    fig = plots.plot_train_dynamics(runs, log.assign(tokens_per_s=np.nan))  # nothing logged: no panel
    assert [ax.get_ylabel() for ax in fig.axes] == ["learning rate", "gradient norm (before clipping)"]
    with pytest.raises(ValueError, match=r"columns: \['mfu_typo'\] not logged"):
        plots.plot_train_dynamics(runs, log, columns=("mfu_typo",))


def test_scaling_groups_draws_every_fitted_configuration_with_width_ticks():
    res = published.load_published()
    fig = plots.plot_scaling_groups(res.runs[res.runs.hooks.fillna("") == ""], res.eval_log)
    stage1, stage2 = fig.axes
    assert (stage1.get_title(), stage2.get_title()) == ("stage1", "stage2")
    legends = [[t.get_text().split(":")[0] for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["R=2", "R=4", "R=6", "R=8"], ["R=6", "R=8", "R=10"]]  # seven fits, as fit_groups finds
    fig.canvas.draw()
    assert [t.get_text() for t in stage1.get_xticklabels()] == ["256", "512", "768", "1024"]
    assert all(t.get_text() == "" for t in stage1.get_xticklabels(minor=True))
