"""Guards the run identity through refactors of the config (issue 25): the run name, identity
hash, variant key, variant fields and identity dict of every preset, every run of every shipped
study and a few override sets equal those recorded before the identity moved onto the fields
(`tests/golden/identity.json`, written by `entry` below at commit 831a703, before the change:
it is not re-recorded: a difference changes stored run ids). The field metadata
(`identity=False`, `in_name=k`) must say exactly what the old hand lists `OPERATIONAL` and
`NAME_KNOBS` said."""
import json
from pathlib import Path

import pytest

from cartlab.studies import list_studies, load_study
from cartlab.train.config import PRESETS, TrainConfig

GOLDEN = json.loads((Path(__file__).parent / "golden" / "identity.json").read_text())

OVERRIDES = {  # the override sets recorded, applied to the smoke preset
    key: key.split(" ") if not key.startswith("model=") else [key] for key in GOLDEN["overrides"]
}


def entry(cfg: TrainConfig) -> dict:
    return {"run_name": cfg.run_name(), "identity_hash": cfg.identity_hash(), "variant": cfg.variant(),
            "variant_fields": cfg.variant_fields(), "identity": cfg.identity()}


@pytest.mark.parametrize("name", sorted(GOLDEN["presets"]))
def test_preset_identity_is_unchanged(name):
    assert sorted(PRESETS) == sorted(GOLDEN["presets"])
    assert entry(TrainConfig.from_preset(name)) == GOLDEN["presets"][name]


@pytest.mark.parametrize("name", sorted(GOLDEN["studies"]))
def test_study_run_identities_are_unchanged(name):
    """Every recorded run of the study is still there, in order, unchanged; a study may grow new
    runs (issue 26 added the published LRT recipe's variants to `lrt`)."""
    got = [{"label": r.label, "seed": r.seed, **entry(r.config)} for r in load_study(name).expand()]
    recorded = GOLDEN["studies"][name]
    keys = {(r["label"], r["seed"]) for r in recorded}
    assert [g for g in got if (g["label"], g["seed"]) in keys] == recorded


def test_every_shipped_study_is_covered():
    assert list_studies() == sorted(GOLDEN["studies"])


@pytest.mark.parametrize("overrides", sorted(OVERRIDES))
def test_overridden_identity_is_unchanged(overrides):
    assert entry(TrainConfig.from_preset("smoke", OVERRIDES[overrides])) == GOLDEN["overrides"][overrides]


def test_operational_fields_leave_the_identity():
    base = TrainConfig.from_preset("smoke")
    moved = base.replace(results_db="elsewhere/r.db", out_dir="x", log_every=3, quiet=True, checkpoint_every=7)
    assert moved.identity() == base.identity() and moved.run_name() == base.run_name()
    assert base.replace(eval_batches=3).identity_hash() != base.identity_hash()


def test_metadata_says_what_the_hand_lists_said():
    from cartlab.train.config import NAME_KNOBS, OPERATIONAL

    assert OPERATIONAL == ("name", "preset", "results_db", "out_dir", "device", "precision", "compile", "parallel",
                           "log_every", "checkpoint_every", "keep_checkpoints", "quiet", "measures", "tracker",
                           "tracking_uri", "tracker_project")
    assert NAME_KNOBS == ("optim.lr", "steps", "seq_len", "batch_size", "grad_accum", "data.recipe")
