"""Study specs (ablations/*.yaml): every shipped study expands into valid run configs that say
what the paper's studies say; bad specs are refused up front with the field named."""
from __future__ import annotations

import pytest

from cartlab.ablate import worker_env
from cartlab.cli import main
from cartlab.model import PAPER_ABLATIONS
from cartlab.model.config import ConfigError
from cartlab.studies import list_studies, load_study

PAPER_HOOKS = set(PAPER_ABLATIONS)  # the hook registry's paper group: section 8's seven ablations


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
    assert hooks == PAPER_HOOKS and len(PAPER_HOOKS) == 7
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


def test_a_studys_runs_go_to_a_tracker_project_named_after_the_study():
    from conftest import need

    need("mlflow")
    runs = load_study("cpu-demo").expand(["tracker=mlflow"])
    assert {r.config.tracker_project for r in runs} == {"cpu-demo"}
    mine = load_study("cpu-demo").expand(["tracker=mlflow", "tracker_project=mine"])
    assert {r.config.tracker_project for r in mine} == {"mine"}
    untracked = load_study("cpu-demo").expand()
    assert {r.config.tracker_project for r in untracked} == {None}  # no tracker, nothing set
    assert [r.run_id for r in runs] == [r.run_id for r in untracked]  # an operational field: same runs


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


# -- compute-budgeted studies: tokens / flops instead of steps, and budget grids (issue 16) -------------

def _study(tmp_path, body: str):
    path = tmp_path / "budget.yaml"
    path.write_text(body)
    return load_study(path)


def test_scaling_grid_is_width_by_token_budget_with_steps_derived_from_tokens():
    import math

    runs = load_study("scaling-grid").expand()
    assert len(runs) == 12
    assert {r.label for r in runs} >= {"cart-d_model48-t1e5", "cart-d_model128-t4e5"}
    for r in runs:
        budget = {"t1e5": 1e5, "t2e5": 2e5, "t4e5": 4e5}[r.label.rsplit("-", 1)[1]]
        steps, per_step = r.config.steps, r.config.tokens_per_step
        assert steps == math.ceil(budget / per_step) and (steps - 1) * per_step < budget <= steps * per_step
        assert f"-steps{steps}-" in r.run_id  # the derived length is part of the run's name and identity
    assert {r.config.model_config().d_model for r in runs} == {48, 64, 96, 128}


def test_flops_budget_spends_each_models_own_accounted_flops(tmp_path):
    """An IsoFLOP sweep: every run's steps x tokens/step x training FLOPs/token of the model it
    trains (the matched Dense's own, not the CART's) reaches the budget within one step."""
    from cartlab.model import account

    runs = _study(tmp_path, "preset: smoke\ngrid: {model.d_model: [64, 128], flops: [2.0e+11]}\n"
                            "runs: [{label: cart}, {label: dense, set: {dense_match: stored}}]\n").expand()
    assert [r.label for r in runs] == ["cart-d_model64-f2e11", "cart-d_model128-f2e11",
                                       "dense-d_model64-f2e11", "dense-d_model128-f2e11"]
    per_step = {}
    for r in runs:
        cfg = r.config
        per_step[r.label] = cfg.tokens_per_step * account(cfg.model_config(), cfg.seq_len).train_flops_per_token()
        assert (cfg.steps - 1) * per_step[r.label] < 2e11 <= cfg.steps * per_step[r.label], r.label
    assert runs[0].config.steps > runs[1].config.steps  # the wider model affords fewer steps
    assert per_step["dense-d_model64-f2e11"] != per_step["cart-d_model64-f2e11"]


def test_a_run_entrys_budget_wins_over_the_studys_and_steps_stay_for_unbudgeted_studies(tmp_path):
    runs = _study(tmp_path, "preset: smoke\ntokens: 5120\nruns: [{label: a}, {label: b, tokens: 10240}]\n").expand()
    assert [r.config.steps for r in runs] == [10, 20]  # smoke: 8 x 64 = 512 tokens per step
    plain = _study(tmp_path, "preset: smoke\nset: {steps: 7}\nruns: [{label: a}]\n").expand()
    assert plain[0].config.steps == 7


@pytest.mark.parametrize("body, message", [
    ("preset: smoke\ngrid: {model.d_modl: [64]}\nruns: [{label: a}]\n",
     "grid.model.d_modl is not a field: did you mean 'd_model'?"),
    ("preset: smoke\ngrid: {tokens: []}\nruns: [{label: a}]\n", "grid.tokens=[] is not allowed: must be a non-empty"),
    ("preset: smoke\ngrid: {tokens: [1.0e+5, -3]}\nruns: [{label: a}]\n",
     "grid.tokens=-3 is not allowed: every budget must be a number > 0"),
    ("preset: smoke\ngrid: {flops: [lots]}\nruns: [{label: a}]\n", "grid.flops='lots' is not allowed"),
    ("preset: smoke\ntokens: 0\nruns: [{label: a}]\n", "tokens=0 is not allowed: must be > 0"),
    ("preset: smoke\nruns: [{label: a, flops: -1}]\n", "runs[0].flops=-1 is not allowed: must be > 0"),
    ("preset: smoke\ntokens: 1.0e+5\nflops: 1.0e+12\nruns: [{label: a}]\n", "give one budget, tokens or flops"),
    ("preset: smoke\ngrid: {tokens: [1.0e+5], flops: [1.0e+12]}\nruns: [{label: a}]\n",
     "the grid already sets grid.tokens; give one budget"),
    ("preset: smoke\ngrid: {tokens: [1.0e+5]}\nruns: [{label: a, flops: 1.0e+12}]\n",
     "runs[0].flops=1000000000000.0 is not allowed: the grid gives every run a budget"),
    ("preset: smoke\nruns: [{label: a, tokens: 1.0e+5, set: {steps: 3}}]\n",
     "runs[0] (a): steps=3 is not allowed: this run's length is its budget tokens=100000"),
    ("preset: smoke\ntokens: 1.0e+5\nset: {steps: 3}\nruns: [{label: a}]\n", "runs[0] (a): steps=3 is not allowed"),
    ("preset: smoke\ngrid: {steps: [3], tokens: [1.0e+5]}\nruns: [{label: a}]\n",
     "runs[0] (a-steps3-t1e5): steps=3 is not allowed"),
    ("preset: smoke\nset: {steps: 3}\nruns: [{label: a}, {label: b, tokens: 1.0e+5}]\n",
     "runs[1] (b): steps=3 is not allowed: this run's length is its budget tokens=100000"),
    ("preset: smoke\nruns: [{label: a, tokens: 100}]\n",
     "runs[0] (a): tokens=100.0 is not allowed: less than one step of this run, 512 tokens"),
    ("preset: smoke\ngrid: {flops: [1.0e+6]}\nruns: [{label: a}]\n",
     "runs[0] (a-f1e6): flops=1000000.0 is not allowed: less than one step of this run"),
])
def test_bad_budgets_are_refused_in_one_line_naming_the_field(tmp_path, body, message):
    with pytest.raises(ConfigError) as err:
        _study(tmp_path, body)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_a_steps_override_of_a_budgeted_study_is_refused(capsys):
    assert main(["ablate", "scaling-grid", "--list", "steps=5"]) == 2
    err = capsys.readouterr().err
    assert "steps=5 is not allowed: this run's length is its budget tokens=100000" in err


# -- the run identity is the variant, not the study (issue 24) -------------------------------------------------
def _resolved(config) -> str:
    """What a run trains, whatever way its study wrote it: the identity with the model resolved
    (a `dense_match: stored` Dense and the same Dense written out in full are one model)."""
    import json

    d = config.identity()
    d["model"] = config.model_config().to_dict()
    d.pop("dense_match", None)
    return json.dumps(d, sort_keys=True)


def test_no_shipped_study_trains_a_variant_that_another_trains_under_another_id():
    from cartlab.studies import list_studies

    ids: dict[str, set[str]] = {}
    for name in list_studies():
        for run in load_study(name).expand():
            ids.setdefault(_resolved(run.config), set()).add(run.run_id)
    twice = {k: v for k, v in ids.items() if len(v) > 1}
    assert not twice, f"one model trained under several run ids: {list(twice.values())}"


def test_the_demo_and_the_lrt_study_share_their_dense_runs():
    demo = {r.run_id for r in load_study("cpu-demo").expand()}
    lrt = load_study("lrt").expand()
    dense = [r for r in lrt if r.label == "dense"]
    assert len(dense) == 2 and all(r.run_id in demo for r in dense)
    assert all(len({r.seed for r in lrt if r.label == label}) >= 2 for label in {r.label for r in lrt})
