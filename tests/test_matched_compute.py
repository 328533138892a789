"""Guards matched-compute comparisons on really trained runs (issue 24, acceptance 1): two
variants of different training FLOPs per token (a Dense and a CART that loops its core 3 times)
trained to one `flops:` budget are both read at the end of their schedules, with no interpolation;
a CART trained past the budget is read mid-schedule, and that is labelled in the table and in the
findings; a mid-schedule read across evaluations more than a tenth of the run apart is refused.
Run: pytest tests/test_matched_compute.py -q
"""
import pytest

from cartlab import results
from cartlab.analysis import compute
from cartlab.analysis.schema import Results
from cartlab.model import account
from cartlab.studies import budget_steps
from cartlab.train import train
from train_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE = {"kind": "dense", "vocab_size": 512, "d_model": 32, "n_heads": 4, "n_layers": 2, "ffn_multiple_of": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """Dense (12 steps) = the budget; CART trained to the same budget; CART trained 12 steps (past
    it, evaluated every step) and CART trained 12 steps evaluated every 4 (past it, sparse evals)."""
    out = tmp_path_factory.mktemp("matched")
    dense = tiny_config(tiny_data, out, model=DENSE, eval_every=3)
    per_step = dense.tokens_per_step * account(dense.model_config(), dense.seq_len).train_flops_per_token()
    at = 12 * per_step
    cart = tiny_config(tiny_data, out, eval_every=3)
    cart = tiny_config(tiny_data, out, eval_every=3, steps=budget_steps(cart, "flops", at))
    long_dense_evals = tiny_config(tiny_data, out, eval_every=1, seed=5)
    long_sparse_evals = tiny_config(tiny_data, out, eval_every=4, seed=6)
    ids = [train(c) for c in (dense, cart, long_dense_evals, long_sparse_evals)]
    db = out / "results.db"
    runs = results.runs(db)
    res = Results(runs, results.train_log(db), results.eval_log(db), results.downstream(db), results.probes(db))
    return at, ids, res, cart.steps


def test_runs_trained_to_one_budget_are_read_at_the_end_of_their_schedules(trained):
    at, (dense, cart, _, _), res, cart_steps = trained
    assert cart_steps < 12  # CART's step costs more: fewer steps reach the budget
    both = res.runs[res.runs.run_id.isin([dense, cart])]
    table = compute.matched_compute(both, res.train_log, res.eval_log, at=at)
    assert list(table["read at budget"]) == ["end of schedule"] * 2
    assert sorted(table["step at budget"]) == sorted([12, cart_steps]) and sorted(table["steps"]) == sorted([12, cart_steps])
    for domain in sorted(res.eval_log.split.unique()):  # the final evaluation itself, nothing interpolated
        assert (table[f"{domain} at budget"] == table[f"final {domain}"]).all()
    flops = res.train_log.groupby("run_id").flops.max()
    assert flops[dense] == pytest.approx(at) and abs(flops[cart] - at) <= flops[cart] / cart_steps


def test_a_mid_schedule_read_is_labelled_in_the_table_and_in_the_findings(trained):
    at, (dense, _, long_run, _), res, _ = trained
    pair = res.runs[res.runs.run_id.isin([dense, long_run])]
    table = compute.matched_compute(pair, res.train_log, res.eval_log, at=at).set_index("read at budget")
    assert set(table.index) == {"end of schedule", "mid-schedule"}
    mid = table.loc["mid-schedule"]
    assert 0 < mid["step at budget"] < mid["steps"] == 12
    sub = Results(pair, res.train_log, res.eval_log, res.downstream, res.probes)
    found = compute.findings(sub, at=at)
    assert found and all(f.note == "mid-schedule read: not a fair comparison" for f in found)
    assert {f.split for f in found} == set(res.eval_log.split.unique())


def test_a_mid_schedule_read_across_sparse_evaluations_is_refused(trained):
    at, (dense, _, _, sparse), res, _ = trained
    pair = res.runs[res.runs.run_id.isin([dense, sparse])]
    table = compute.matched_compute(pair, res.train_log, res.eval_log, at=at)
    row = table[table["read at budget"] != "end of schedule"].iloc[0]
    assert row["read at budget"] == "mid-schedule, evaluations 4 steps apart: not read"
    domains = sorted(res.eval_log.split.unique())
    assert all(row[f"{d} at budget"] != row[f"{d} at budget"] for d in domains)  # NaN: not read
    found = compute.findings(Results(pair, res.train_log, res.eval_log, res.downstream, res.probes), at=at)
    assert {f.verdict for f in found} == {"not measured"} and "not read" in found[0].note
