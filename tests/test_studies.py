"""Study specs (ablations/*.yaml): every shipped study expands into valid run configs that say
what the paper's studies say; bad specs are refused up front with the field named."""
from __future__ import annotations

import pytest

from cartlab.ablate import worker_env
from cartlab.cli import main
from cartlab.model.config import ConfigError
from cartlab.studies import list_studies, load_study

PAPER_HOOKS = {"unfreeze_kv", "single_loop", "unshare_core", "self_attn_core", "no_hyper", "no_lti", "no_lie"}


def test_the_papers_studies_and_the_demo_are_shipped():
    assert {"cpu-demo", "paper-stage1-screen", "paper-stage2-sweep", "paper-dense-baselines",
            "paper-diagnostics"} <= set(list_studies())


@pytest.mark.parametrize("name", list_studies())
def test_every_study_expands_into_distinct_valid_runs(name):
    study = load_study(name)
    runs = study.expand()
    assert runs, name
    assert len({r.run_id for r in runs}) == len(runs), "two entries of a study must not train the same run"
    for r in runs:
        r.config.model_config()  # builds and validates the model config (hook conflicts included)


def test_stage1_screen_is_the_64_config_grid_and_stage2_the_36_run_sweep():
    s1 = load_study("paper-stage1-screen").expand()
    assert len(s1) == 64
    assert {(r.config.model_config().d_model, r.config.model_config().prelude_layers, r.config.model_config().n_loops)
            for r in s1} == {(d, p, n) for d in (256, 512, 768, 1024) for p in (2, 4, 6, 8) for n in (2, 4, 6, 8)}
    assert {r.config.steps for r in s1} == {3000}
    s2 = load_study("paper-stage2-sweep").expand()
    assert len(s2) == 36 and {r.seed for r in s2} == {42, 43, 44}
    assert {r.config.model_config().prelude_layers for r in s2} == {6}


def test_diagnostics_cover_the_seven_section8_hooks_at_the_binding_corner():
    runs = load_study("paper-diagnostics").expand()
    hooks = set().union(*(set(r.config.model_config().hooks) for r in runs))
    assert hooks == PAPER_HOOKS
    base = [r for r in runs if r.label == "baseline"]
    assert len(base) == 3  # the seed band
    assert {(r.config.model_config().d_model, r.config.model_config().prelude_layers) for r in runs} == {(1024, 6)}


def test_dense_baselines_are_stored_and_effective_matched():
    runs = {r.label: r for r in load_study("paper-dense-baselines").expand() if r.seed == 42}
    assert runs["dense-7L-stored"].config.model_config().n_layers == 7
    assert runs["dense-12L-effective"].config.model_config().n_layers == 12
    assert runs["baseline"].config.model_config().kind == "cart"


def test_cpu_demo_has_a_two_seed_baseline_matched_dense_and_ablations_on_embedded_data():
    runs = load_study("cpu-demo").expand()
    assert sorted(r.seed for r in runs if r.label == "baseline") == [1, 2]
    kinds = {r.label: r.config.model_config().kind for r in runs}
    assert kinds["dense-stored"] == kinds["dense-effective"] == "dense"
    assert {r.config.data.recipe for r in runs} == {"embedded"}
    assert sum(bool(getattr(r.config.model_config(), "hooks", ())) for r in runs) >= 3


def test_overrides_reach_every_run():
    runs = load_study("cpu-demo").expand(["results_db=/x/lab.db", "optim.lr=1e-3"])
    assert {r.config.results_db for r in runs} == {"/x/lab.db"}
    assert {r.config.optim.lr for r in runs} == {1e-3}


@pytest.mark.parametrize("body, message", [
    ("preset: smoke\nruns: [{label: a}]\nseeds: [1]\nbogus: 1\n", "bogus is not a field"),
    ("runs: [{label: a}]\n", "preset is missing"),
    ("preset: smoke\nruns: []\n", "at least one entry"),
    ("preset: smoke\nruns: [{label: a}, {label: a}]\n", "labels must be unique"),
    ("preset: smoke\nruns: [{label: a, hook: [no_lti]}]\n", "runs[0].hook is not a field: did you mean 'hooks'?"),
    ("preset: smoke\nruns: [{label: a, hooks: [no_such_hook]}]\n", "no_such_hook"),
    ("preset: nope\nruns: [{label: a}]\n", "preset='nope' is not allowed"),
])
def test_bad_study_specs_are_refused_naming_the_field(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert message in str(err.value)


def test_unknown_study_lists_the_known_ones(capsys):
    assert main(["ablate", "no-such-study", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cartlab: error: study 'no-such-study' not found") and "cpu-demo" in err
    assert len(err.splitlines()) == 1


def test_ablate_list_shows_every_run_pending_and_takes_overrides_after_options(tmp_path, capsys):
    assert main(["ablate", "cpu-demo", "--list", "--db", str(tmp_path / "x.db"), "optim.lr=1e-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(load_study("cpu-demo").expand()) and all(ln.startswith("pending") for ln in lines)


def test_parallel_workers_get_one_gpu_each_or_a_share_of_the_cores():
    assert worker_env(0, 2, ["0", "1"], 8) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert worker_env(3, 4, ["0", "1"], 8) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert worker_env(1, 2, [], 8) == {"OMP_NUM_THREADS": "4"}
    assert worker_env(0, 4, [], 2) == {"OMP_NUM_THREADS": "1"}  # never zero threads
