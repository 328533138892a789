"""Guards `cartlab.analysis.findings` (what a report concludes) and the `findings` table:
1. the verdict rule: a known effect far outside the seed noise is a signal, a zero effect is
   within noise (and a false signal about 5% of the time, as a 95% interval should give), one seed
   is "not enough seeds" whatever the effect, a missing side is "not measured";
2. a synthetic study with a known effect per domain (CART better than its Dense on prose, equal on
   stories, a single-seed ablation) gets the right verdict on every domain, in words under "What
   this study shows";
3. findings are stored in the results database, replaced (not appended) on the next report.
Run: pytest tests/test_findings.py -q
"""
import math

import numpy as np
import pandas as pd
import pytest

from cartlab.analysis import decompose, findings
from cartlab.analysis.schema import Results
from cartlab.analysis.synthetic import eval_rows, run_row


# -- 1. the verdict rule ----------------------------------------------------------------------------------
def test_a_known_effect_is_a_signal_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    a, b = 2.0 + rng.normal(0, 0.01, 4), 2.5 + rng.normal(0, 0.01, 4)
    effect, low, high, verdict = findings.compare(a, b)
    assert verdict == "signal" and low < -0.5 < high and high < 0
    assert effect == pytest.approx(a.mean() - b.mean())


def test_no_effect_is_within_noise_and_a_false_signal_about_one_time_in_twenty():
    rng = np.random.default_rng(1)
    verdicts = [findings.compare(rng.normal(0, 1, 3), rng.normal(0, 1, 3))[3] for _ in range(2000)]
    assert set(verdicts) == {"signal", "within noise"}
    assert 0.02 < verdicts.count("signal") / len(verdicts) < 0.08  # Welch's interval holds its 95%


def test_one_seed_is_never_a_result_and_a_missing_side_is_not_measured():
    effect, low, high, verdict = findings.compare([1.0], [5.0, 5.1, 4.9])  # a huge effect, one seed
    assert verdict == "not enough seeds" and effect == pytest.approx(-4.0)
    assert low < effect < high  # the interval borrows the seeded side's noise, wide (t with 2 dof)
    assert findings.compare([1.0], [2.0])[3] == "not enough seeds" and math.isnan(findings.compare([1.0], [2.0])[1])
    assert findings.compare([], [1.0, 2.0])[3] == "not measured"
    assert findings.compare([np.nan, np.nan], [1.0, 2.0])[3] == "not measured"
    assert findings.paired([0.5, 0.52, 0.49])[3] == "signal" and findings.paired([0.5])[3] == "not enough seeds"


# -- 2. a study with known effects -----------------------------------------------------------------------
def study(cart_seeds=3, dense_seeds=3, effect=-0.3, noise=0.02, seed=0) -> Results:
    """CART (d=128 P=2 R=4) and its stored-matched Dense: CART is `effect` nats better on prose,
    equal on stories; the iteration domain only CART was evaluated on. One single-seed no_lti."""
    rng = np.random.default_rng(seed)
    runs, ppl = [], {}
    for s in range(cart_seeds):
        rid = f"cart-s{s}"
        runs.append(run_row(rid, d_model=128, prelude_layers=2, n_loops=4, seed=s, stage="demo",
                            stored_params=1e6, effective_params=2e6))
        ppl[rid] = {"prose": math.exp(6.0 + effect + rng.normal(0, noise)), "stories": math.exp(1.0 + rng.normal(0, noise)),
                    "iteration": math.exp(1.5 + rng.normal(0, noise))}
    for s in range(dense_seeds):
        rid = f"dense-s{s}"
        runs.append(run_row(rid, model="dense", d_model=128, n_layers=4, seed=s, stage="demo", stored_params=1e6,
                            effective_params=1e6))
        ppl[rid] = {"prose": math.exp(6.0 + rng.normal(0, noise)), "stories": math.exp(1.0 + rng.normal(0, noise))}
    runs.append(run_row("nolti-s0", d_model=128, prelude_layers=2, n_loops=4, seed=0, stage="demo", hooks="no_lti"))
    ppl["nolti-s0"] = {"prose": math.exp(7.0), "stories": math.exp(1.0), "iteration": math.exp(1.5)}
    empty = pd.DataFrame()
    return Results(pd.DataFrame(runs), empty, eval_rows(ppl, step=200), empty, None)


def by_domain(found, analysis):
    return {f.split: f for f in found if f.analysis == analysis}


def test_a_synthetic_study_gets_the_right_verdict_on_every_domain():
    found = decompose.findings(study())
    gap = by_domain(found, "gap")
    assert gap["prose"].verdict == "signal" and gap["prose"].effect == pytest.approx(-0.3, abs=0.05)
    assert gap["prose"].low < -0.3 < gap["prose"].high and (gap["prose"].n_a, gap["prose"].n_b) == (3, 3)
    assert gap["stories"].verdict == "within noise" and gap["stories"].low < 0 < gap["stories"].high
    assert gap["iteration"].verdict == "not measured"  # Dense has no iteration evaluation
    ablation = by_domain(found, "ablation")
    assert ablation["prose"].verdict == "not enough seeds" and ablation["prose"].effect > 0.9  # big, but one seed
    assert {f.verdict for f in ablation.values()} == {"not enough seeds"}


def test_too_few_seeds_on_the_dense_side_is_not_a_result():
    gap = by_domain(decompose.findings(study(dense_seeds=1)), "gap")
    assert gap["prose"].verdict == "not enough seeds" and gap["prose"].n_b == 1


def test_what_this_study_shows_states_every_domain_in_words():
    text = findings.shows_markdown(decompose.findings(study()), completeness="7 of 7 runs trained.")
    assert text.startswith("## What this study shows") and "7 of 7 runs trained." in text
    assert "Headline domain: **prose**" in text
    gap_line = next(line for line in text.splitlines() if line.startswith("- **") and "matched" in line)
    assert "a signal on 1 of 2 domains measured (1 not measured): lower (better) on prose" in gap_line
    for phrase in ("prose -0.2", "**signal**", "stories", "**within noise**", "iteration: not measured",
                   "3 seeds vs 3"):
        assert phrase in gap_line, phrase
    assert "not enough seeds to state a result" in text  # the one-seed ablation


# -- 3. stored in the results database ---------------------------------------------------------------------
def test_findings_are_stored_and_replaced_in_the_results_database(tmp_path):
    from cartlab import results
    from cartlab.report import store_findings
    from cartlab.results.db import ResultsDB

    db = tmp_path / "results.db"
    ResultsDB(db).close()
    found = decompose.findings(study())
    store_findings("demo-study", db, found)
    store_findings("demo-study", db, found[:2])  # a second report replaces the first one's rows
    stored = results.findings(db, "demo-study")
    assert len(stored) == 2 and set(stored.study) == {"demo-study"} and stored.code_version.notna().all()
    for got, want in zip(findings.from_frame(stored), found[:2]):  # read back as they were written
        assert pd.Series(got.__dict__).equals(pd.Series(want.__dict__)), (got, want)
    assert results.findings(db, "another").empty


def test_loops_past_the_trained_r_are_judged_per_seed_and_domain():
    """depth.findings: loss at inference 2R minus at the trained R, paired within each seed: a
    model that degrades past R by 0.2 nats on every seed is a signal on that domain, one that
    stays flat within seed noise is not; a single-seed variant is not enough seeds."""
    from cartlab.analysis import depth

    runs, rows = [], []
    for s, (base, drift) in enumerate([(1.50, 0.0), (1.53, 0.002), (1.48, -0.001)]):
        rid = f"cart-s{s}"
        runs.append(run_row(rid, d_model=128, prelude_layers=2, n_loops=4, seed=s, stage="demo"))
        for r in (1, 2, 4, 8):
            rows += [{"run_id": rid, "probe": "depth_profile", "step": 200, "split": "iteration", "x": r,
                      "metric": "loss", "value": base + (0.2 if r == 8 else 0.0)},
                     {"run_id": rid, "probe": "depth_profile", "step": 200, "split": "prose", "x": r,
                      "metric": "loss", "value": 6.0 + (drift if r == 8 else 0.0)}]
    runs.append(run_row("one-s0", d_model=128, prelude_layers=2, n_loops=4, seed=0, stage="demo", hooks="no_lti"))
    rows += [{"run_id": "one-s0", "probe": "depth_profile", "step": 200, "split": "prose", "x": r, "metric": "loss",
              "value": 6.0 + 0.5 * (r == 8)} for r in (1, 2, 4, 8)]
    rows += [{**r, "metric": "ppl", "value": math.exp(r["value"])} for r in rows]  # the measure stores both
    res = Results(pd.DataFrame(runs), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(rows))
    found = {(f.a, f.split): f for f in depth.findings(res)}
    base = next(a for a, _ in found if "no_lti" not in a)
    assert found[base, "iteration"].verdict == "signal" and found[base, "iteration"].effect == pytest.approx(0.2)
    assert found[base, "prose"].verdict == "within noise"
    one = next(a for a, _ in found if "no_lti" in a)
    assert found[one, "prose"].verdict == "not enough seeds" and "8 loops at inference vs the trained 4" in found[one, "prose"].claim
