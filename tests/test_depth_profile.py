"""The test-time depth profile (issue 14): the `depth_profile` measure, its grid, the shape rule of
`cartlab.analysis.depth` and the seed grouping of its summary.

Guards: the one-pass profile (`losses_by_depth`) equals separate forwards at every inference R for
every core variant; a tiny training run stores the profile on the documented grid, and at the
trained R it equals the run's final evaluation (same batches, same weights), also under random
loops with truncated BPTT; synthetic profiles of each shape are classified right, also under
noise below the tolerance and on either side of its boundary; seeds are pooled within a variant
only and the seeds' spread widens the tolerance; `cartlab eval --n-loops profile` expands to the
grid. Run: pytest tests/test_depth_profile.py (about 30 s).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cartlab import results
from cartlab.analysis.depth import (
    SHAPES, classify_profile, depth_profiles, describe, profile_means, profile_table, summarise_profiles,
)
from cartlab.analysis.synthetic import run_row
from cartlab.measures.depth import depth_grid, losses_by_depth, profile_grid
from cartlab.model import CARTConfig, DenseConfig, build_model
from cartlab.train import train
from train_helpers import TINY_MODEL, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


# -- the grid ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [1, 2, 3, 4, 6, 7])
def test_grid_is_every_integer_to_2R_then_sparse_to_4R(R):
    grid = depth_grid(R)
    assert grid == sorted(set(grid)) and grid[-1] == 4 * R
    assert [r for r in grid if r <= 2 * R] == list(range(1, 2 * R + 1))
    assert len([r for r in grid if r > 2 * R]) <= 3 and 3 * R in grid
    assert depth_grid(R, max_r=R) == list(range(1, R + 1))


def test_grid_of_an_unshared_core_stops_at_its_blocks_and_dense_has_none():
    assert profile_grid(CARTConfig.tiny(n_loops=3)) == depth_grid(3)
    assert profile_grid(CARTConfig.tiny(n_loops=3, hooks=("unshare_core",))) == [1, 2, 3]
    unshared_random = CARTConfig.tiny(n_loops=3, hooks=("unshare_core", "random_loops"))  # 5 blocks: R in 1..5
    assert profile_grid(unshared_random) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="only 'cart' loops"):
        profile_grid(DenseConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, ffn_multiple_of=16))
    with pytest.raises(ValueError, match="trained_r=0 is not allowed"):
        depth_grid(0)


# -- the measure ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks", [(), ("unshare_core",), ("self_attn_core",), ("unfreeze_kv",), ("no_hyper",),
                                   ("no_lti", "no_lie"), ("random_loops", "truncated_bptt")])
def test_one_pass_profile_equals_a_forward_per_inference_R(hooks):
    torch.manual_seed(0)
    cfg = CARTConfig.tiny(hooks=hooks, n_loops=3)
    model = build_model(cfg).eval()
    x, y = torch.randint(0, cfg.vocab_size, (2, 2, 16)).unbind(0)
    grid = profile_grid(cfg)
    with torch.no_grad():
        got = losses_by_depth(model, x, y, grid)
        want = {r: model(x, y, n_loops=r)[1].item() for r in grid}
    assert list(got) == grid
    assert max(abs(got[r] - want[r]) for r in grid) <= 1e-6
    assert len({round(v, 4) for v in want.values()}) > 1  # the profile is not flat: R matters


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """Two tiny runs with only the depth profile measured: fixed R=3, and random loops with truncated BPTT."""
    out = tmp_path_factory.mktemp("depth_runs")
    ids = [train(tiny_config(tiny_data, out, steps=4, eval_every=4, checkpoint_every=4, measures=["depth_profile"],
                             model={**TINY_MODEL, "hooks": list(hooks)}))
           for hooks in ((), ("random_loops", "truncated_bptt"))]
    db = out / "results.db"
    return {"ids": ids, "db": db, "runs": results.runs(db), "eval": results.eval_log(db, ids),
            "probes": results.probes(db, ids)}


def test_training_stores_the_profile_and_at_the_trained_R_it_is_the_final_eval(trained):
    probes, ev = trained["probes"], trained["eval"]
    assert set(probes["probe"]) == {"depth_profile"} and set(probes["step"]) == {4}  # once, after the last eval
    for run_id in trained["ids"]:
        p = probes[probes.run_id == run_id]
        final = ev[(ev.run_id == run_id) & (ev.step == 4)].set_index("split")
        assert set(p["split"]) == set(final.index) and len(final) >= 2
        for split, g in p.groupby("split"):
            loss = g[g.metric == "loss"].set_index("x")["value"]
            ppl = g[g.metric == "ppl"].set_index("x")["value"]
            assert list(loss.index) == depth_grid(3) and list(ppl.index) == depth_grid(3)
            assert abs(loss[3] - final.loc[split, "loss"]) <= 1e-6
            assert np.allclose(ppl, np.exp(loss))
    prof = depth_profiles(probes, trained["runs"])
    assert set(prof["trained_r"]) == {3} and prof.groupby("run_id").size().nunique() == 1
    assert prof["config"].nunique() == 2  # the two runs are two variants


def test_the_profile_is_only_measured_for_models_that_loop(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="'depth_profile' does not apply to a dense model"):
        tiny_config(tiny_data, tmp_path, measures=["depth_profile"], dense_match="stored")


# -- the shape rule ---------------------------------------------------------------------------------
R = 4
GRID = np.array(depth_grid(R), dtype=float)
DOWN = 3.0 + 1.5 * np.exp(-(GRID - 1))  # falls to ~3.07 at R and keeps falling a little


def _shape(kind: str) -> np.ndarray:
    """A profile of each shape on the R=4 grid, in nats."""
    to_r = np.where(GRID <= R, 3.0 + 0.4 * (R - GRID), 3.0)  # improves up to R
    if kind == "monotone":
        return 3.0 + 0.4 * (4 * R - GRID) / R  # keeps improving out to 4R
    if kind == "plateau":
        return to_r
    if kind == "v-shape":
        return to_r + 0.05 * np.maximum(GRID - R, 0)
    if kind == "degrading":
        return 3.0 + 0.05 * (GRID - 1)
    if kind == "other":  # worse just past R, recovered by 4R
        return to_r + np.where((GRID > R) & (GRID < 3 * R), 0.3, 0.0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["monotone", "plateau", "v-shape", "degrading", "other"])
def test_synthetic_profiles_are_classified_by_their_shape(kind):
    L = _shape(kind)
    assert classify_profile(GRID, L, R) == kind
    order = np.random.default_rng(0).permutation(len(GRID))
    assert classify_profile(GRID[order], L[order], R) == kind  # any order


def test_a_grid_that_stops_at_the_trained_R_is_untested():
    assert classify_profile([1, 2, 3, 4], [4.0, 3.5, 3.2, 3.0], R) == "untested"
    assert "untested" in SHAPES


@pytest.mark.parametrize("kind", ["monotone", "plateau", "v-shape"])
def test_noise_below_the_tolerance_does_not_change_the_shape(kind):
    rng = np.random.default_rng(1)
    tol = 0.04
    for _ in range(50):
        noisy = _shape(kind) + rng.uniform(-0.2 * tol, 0.2 * tol, len(GRID))
        assert classify_profile(GRID, noisy, R, tol=tol) == kind


def test_the_tolerance_is_the_boundary_between_flat_and_worse():
    tol = 0.1
    flat = _shape("plateau")
    for rise, shape in ((tol * 0.99, "plateau"), (tol * 1.01, "v-shape")):
        L = flat + np.where(GRID > R, rise, 0.0)
        assert classify_profile(GRID, L, R, tol=tol) == shape
    for gain, shape in ((tol * 0.99, "plateau"), (tol * 1.01, "monotone")):
        L = flat - np.where(GRID > R, gain, 0.0)
        assert classify_profile(GRID, L, R, tol=tol) == shape
    assert classify_profile(GRID, flat + 0.01 * np.maximum(GRID - R, 0), R) == "v-shape"  # default: 1% of L(R)
    assert classify_profile(GRID, flat + 0.001 * np.maximum(GRID - R, 0), R) == "plateau"


@pytest.mark.parametrize("args, message", [
    (([1, 2, 3], [3.0, 2.0, 2.5], 5), "trained_r=5 is not among n_loops"),
    (([1, 2, 2], [3.0, 2.0, 2.5], 2), "repeated inference R"),
    (([1, 2, 3], [3.0, np.nan, 2.5], 2), "must be finite"),
    (([1, 2, 3], [3.0, 2.0], 2), "equal length"),
])
def test_bad_profiles_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        classify_profile(*args)
    with pytest.raises(ValueError, match="tol: must be >= 0"):
        classify_profile(GRID, DOWN, R, tol=-1)


# -- seeds and variants -----------------------------------------------------------------------------
def _probe_rows(run_id: str, profile: dict[str, np.ndarray], step: int = 200) -> list[dict]:
    return [{"run_id": run_id, "probe": "depth_profile", "step": step, "split": split, "x": int(r), "metric": m,
             "value": float(v if m == "loss" else np.exp(v))}
            for split, L in profile.items() for r, v in zip(GRID, L) for m in ("loss", "ppl")]


def _study():
    """Fixed-R CART (2 seeds, V on prose, plateau on stories) and a second variant with the same label
    (its learning rate differs, variant hashes differ: never its seeds), monotone everywhere."""
    runs = pd.DataFrame([
        run_row("fixed-s1", seed=1, n_loops=R, variant="aaaaaaaaaaaa", variant_label="cart R=4"),
        run_row("fixed-s2", seed=2, n_loops=R, variant="aaaaaaaaaaaa", variant_label="cart R=4"),
        run_row("lr-s1", seed=1, n_loops=R, variant="bbbbbbbbbbbb", variant_label="cart R=4"),
    ])
    probes = pd.DataFrame(
        _probe_rows("fixed-s1", {"prose": _shape("v-shape"), "stories": _shape("plateau")})
        + _probe_rows("fixed-s2", {"prose": _shape("v-shape") + 0.02, "stories": _shape("plateau") - 0.02})
        + _probe_rows("lr-s1", {"prose": _shape("monotone"), "stories": _shape("monotone")})
        + _probe_rows("fixed-s1", {"prose": _shape("monotone")}, step=100)  # an earlier measurement: ignored
        + [{"run_id": "fixed-s1", "probe": "logit_lens", "step": 200, "split": "prose", "x": 1, "metric": "loss",
            "value": 9.0}])
    return runs, probes


def test_seeds_are_pooled_within_a_variant_and_two_variants_never():
    runs, probes = _study()
    prof = depth_profiles(probes, runs)
    assert len(prof) == 3 * 2 * len(GRID)  # 3 runs x 2 domains, at each run's last step only
    assert prof["config"].nunique() == 2  # one label, two variants: told apart
    s = summarise_profiles(prof).set_index(["variant", "split"])
    assert len(s) == 4
    fixed, other = s.loc[("aaaaaaaaaaaa", "prose")], s.loc[("bbbbbbbbbbbb", "prose")]
    assert fixed.n_seeds == 2 and other.n_seeds == 1
    assert fixed.loss_trained == pytest.approx(3.01)  # mean of 3.0 and 3.02: the variant's two seeds only
    assert fixed["shape"] == "v-shape" and not fixed.improves_past_trained and fixed.best_r == R
    assert other["shape"] == "monotone" and other.improves_past_trained and other.best_r == 4 * R
    assert s.loc[("aaaaaaaaaaaa", "stories"), "shape"] == "plateau"
    assert fixed.seed_shapes == "v-shape, v-shape"
    assert fixed.sentence.startswith("cart R=4 #aaaaaa on prose: v-shape") and "does not improve past" in fixed.sentence
    means = profile_means(prof).set_index(["variant", "split", "n_loops"])
    assert means.loc[("aaaaaaaaaaaa", "prose", R), "n"] == 2 and means.loc[("bbbbbbbbbbbb", "prose", R), "n"] == 1
    table = profile_table(prof)
    assert list(table.columns) == [f"R={r}" for r in depth_grid(R)] and len(table) == 4
    text = describe(summarise_profiles(prof))
    assert text.count("\n- ") == 1 and "does **not** improve past its trained R=4" in text
    assert "**keeps improving past its trained R=4** on every domain" in text


def test_the_seeds_spread_widens_the_tolerance():
    """A small V (0.06 nats at 4R) is a V for each seed at 1%, but not when the seeds' own losses
    at the trained R are 0.2 nats apart: 2 sd of that spread swallows it."""
    runs = pd.DataFrame([run_row(f"s{i}", seed=i, n_loops=R, variant="cccccccccccc") for i in (1, 2)])
    small_v = _shape("plateau") + 0.005 * np.maximum(GRID - R, 0)
    probes = pd.DataFrame(_probe_rows("s1", {"prose": small_v}) + _probe_rows("s2", {"prose": small_v + 0.2}))
    row = summarise_profiles(depth_profiles(probes, runs)).iloc[0]
    assert row.seed_shapes == "v-shape, v-shape"
    assert row.tol == pytest.approx(2 * 0.2 / np.sqrt(2)) and row["shape"] == "plateau"
    assert summarise_profiles(depth_profiles(probes, runs), k=0).iloc[0]["shape"] == "v-shape"


def test_runs_without_profiles_give_an_empty_frame():
    runs, probes = _study()
    assert depth_profiles(None, runs).empty
    assert depth_profiles(probes[probes.probe == "logit_lens"], runs).empty
    assert list(depth_profiles(None, runs).columns) == list(depth_profiles(probes, runs).columns)


# -- cartlab eval --n-loops profile -----------------------------------------------------------------
def test_eval_n_loops_profile_expands_to_the_checkpoints_grid(trained):
    from cartlab.eval.cli import expand_loops

    ckpt = trained["db"].parent / trained["ids"][0]
    assert expand_loops("profile", str(ckpt)) == ",".join(map(str, depth_grid(3)))
    assert expand_loops("2,4", str(ckpt)) == "2,4" and expand_loops(None, str(ckpt)) is None


def test_eval_n_loops_profile_refuses_a_dense_checkpoint(tmp_path):
    import json

    from cartlab.eval.cli import expand_loops

    dense = DenseConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, ffn_multiple_of=16)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model": dense.to_dict()}))
    with pytest.raises(ValueError, match="--n-loops profile: only CART checkpoints loop; this one is dense"):
        expand_loops("profile", str(tmp_path))


def test_the_figure_has_a_labelled_panel_per_domain_and_the_shape_in_each_legend():
    from cartlab.analysis.plots import plot_depth_profiles

    runs, probes = _study()
    prof = depth_profiles(probes, runs)
    fig = plot_depth_profiles(prof, summarise_profiles(prof))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["prose: loss against inference R", "stories: loss against inference R"]
    assert all(ax.get_xlabel() == "inference loop count R" and ax.get_ylabel() for ax in axes) and fig._suptitle
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert len(legend) == 2 and len(set(legend)) == 2  # one entry per variant, never shared
    assert sorted(label.rsplit(" [", 1)[1] for label in legend) == ["monotone]", "v-shape]"]
    assert {line.get_xdata()[0] for line in axes[0].lines if line.get_linestyle() == ":"} == {R}  # trained R
    with pytest.raises(ValueError, match="no depth profiles"):
        plot_depth_profiles(prof.iloc[:0])


def test_a_loss_that_only_rises_from_the_trained_r_is_rising_not_a_v_shape():
    """`single_loop`: trained at R=1, the smallest R measured, and worse at every R past it. A V needs
    a descent into its best point; this profile has one arm only."""
    import cartlab.analysis.depth as depth

    grid = np.array(depth_grid(1), dtype=float)
    rising = 3.0 + 0.3 * (grid - 1)
    assert classify_profile(grid, rising, 1) == "rising"
    assert classify_profile(GRID, np.where(GRID <= R, 3.0, 3.0 + 0.05 * (GRID - R)), R) == "rising"  # flat, then up
    assert classify_profile(GRID, _shape("v-shape"), R) == "v-shape"  # a descent into R keeps its V
    assert "rising" in SHAPES and '"rising"' in depth.__doc__ and "R=1" in depth.__doc__  # the written rule says so
    profiles = pd.DataFrame([{"run_id": f"s{s}", "variant": "one", "config": "cart R=1 [single_loop]", "seed": s,
                              "split": "prose", "n_loops": int(r), "loss": float(L) + 0.01 * s, "ppl": np.exp(L),
                              "trained_r": 1} for s in (1, 2) for r, L in zip(grid, rising)])
    row = summarise_profiles(profiles).iloc[0]
    assert row["shape"] == "rising" and row.best_r == 1 and not row.improves_past_trained
