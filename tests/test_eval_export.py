"""lm-eval with a per-token exit rule through the exported transformers model (issue 27
acceptance 5): `cartlab eval EXPORT --exit ...` scores an exported folder with lm-eval's hf model
and stores the same rows as `cartlab eval CHECKPOINT` with the same flags (run, step, protocol
with the exit rule, scores, and the mean loops per token); plain `lm_eval --model hf` with
`exit=...,exit_threshold=...` in its model args, in a process without cartlab, scores with the
rule (cartlab's own loglikelihoods with it, not the fixed-R ones). Offline: data/tasks.
Run: pytest tests/test_eval_export.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_db, need

lm_eval = need("lm_eval")
need("accelerate", "lm-eval's hf model needs accelerate (pip install -e '.[eval]')")

from cartlab import results  # noqa: E402
from cartlab.cli import main  # noqa: E402
from cartlab.export.write import export  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_offline", "one_thread")
RULE = dict(exit="kl", exit_threshold=0.01)  # on the tiny run: some tokens stop after 1 loop, most after 2
R = 6  # the most loops a token runs: twice the tiny run's trained R=3
PAIRS = [("The fox", " jumped over the lazy dog"), ("Once upon a time there was", " a cat"), ("A", " b c d e f"),
         ("Two plus two is", " four"), ("", " The end.")]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello there."]  # the first: several windows of 32
PROMPTS = ["Once upon a time", "The cat sat on the", "A list is"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run) -> Path:
    """The tiny run's newest checkpoint as an exported transformers folder."""
    return export(tiny_run.run_dir, tmp_path_factory.mktemp("eval_export") / "hf", log=lambda s: None)


def scored(lm) -> dict:
    """What `lm` (lm-eval model) answers, with the rule, to each kind of request, and its mean
    loops per token for each kind."""
    from lm_eval.api.instance import Instance

    until = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    kinds = {"loglikelihood": PAIRS, "loglikelihood_rolling": [(t,) for t in TEXTS],
             "generate_until": [(p, until) for p in PROMPTS]}
    out = {}
    for kind, args in kinds.items():
        lm.set_loops(R, **RULE)
        out[kind] = getattr(lm, kind)([Instance(kind, {}, a, i) for i, a in enumerate(args)])
        out[f"{kind} loops"] = lm.mean_loops()
    return out


def test_the_export_through_lm_evals_hf_model_scores_and_counts_loops_as_the_cartlab_model(exported, tiny_run):
    from cartlab.eval.exported import ExportLM
    from cartlab.eval.lm import CartlabLM

    hf = scored(ExportLM(exported, batch_size=3, quiet=True))  # batches of 3: right-padded rows
    ours = scored(CartlabLM(checkpoint=str(tiny_run.checkpoint), batch_size=3, quiet=True))
    assert [s for s, _ in hf["loglikelihood"]] == pytest.approx([s for s, _ in ours["loglikelihood"]], abs=1e-4)
    assert hf["loglikelihood_rolling"] == pytest.approx(ours["loglikelihood_rolling"], abs=1e-4)
    assert hf["generate_until"] == ours["generate_until"]
    for kind in ("loglikelihood", "loglikelihood_rolling"):  # the loops of the scored positions, padding left out
        loops = hf[f"{kind} loops"]
        assert loops != int(loops), f"{kind}: every token stopped at one loop; the count could not tell positions apart"
        assert loops == ours[f"{kind} loops"] and 1 < loops < R, kind
    assert 1 < hf["generate_until loops"] < R  # every real position the batch ran (not CartlabLM's count)


def test_an_lrt_export_generates_in_padded_batches_what_cartlab_generates(tiny_data, tmp_path):
    from lm_eval.api.instance import Instance
    from test_export import VARIANTS, write_checkpoint

    from cartlab.eval.exported import ExportLM
    from cartlab.eval.lm import CartlabLM

    ckpt = write_checkpoint(tmp_path / "lrt", VARIANTS["lrt"], tiny_data)
    folder = export(ckpt, tmp_path / "hf", log=lambda s: None)
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 4}), i)
                for i, p in enumerate(PROMPTS)]
    hf = ExportLM(folder, batch_size=3, quiet=True)
    assert hf.generate_until(requests) == CartlabLM(checkpoint=str(ckpt), quiet=True).generate_until(requests)


@pytest.mark.slow
def test_cartlab_eval_of_an_export_stores_what_its_checkpoint_stores(exported, tiny_run, tmp_path):
    def stored(target, db: Path):
        copy_db(tiny_run.db, db)
        assert main(["eval", str(target), "--db", str(db), "--quiet", "--tasks", "cartlab_mc", "--n-loops", str(R),
                     "--batch-size", "4", "--exit", RULE["exit"], "--exit-threshold", str(RULE["exit_threshold"])]) == 0
        return results.downstream(db).set_index(["task", "metric", "protocol"]).sort_index()

    ours, theirs = stored(exported, tmp_path / "export.db"), stored(tiny_run.checkpoint, tmp_path / "checkpoint.db")
    assert (ours.run_id == tiny_run.run_id).all() and (ours.step == int(tiny_run.checkpoint.name[5:])).all()
    assert (ours.exit_rule == "kl:0.01").all() and (ours.n_loops == R).all()
    assert list(ours.index) == list(theirs.index)  # one protocol: the checkpoint's, exit rule included
    assert ours.value.tolist() == pytest.approx(theirs.value.tolist(), rel=1e-6)
    assert 1 < ours.xs("loops_per_token", level="metric").value.item() < R  # the rule stopped tokens early


@pytest.mark.slow
def test_plain_lm_eval_hf_scores_with_the_exit_rule_in_its_model_args(exported, tiny_run, tmp_path, repo):
    from test_export import no_cartlab_env

    from cartlab.eval.lm import CartlabLM
    from cartlab.eval.run import local_tasks

    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval_bin)] if lm_eval_bin.is_file() else [sys.executable, "-m", "lm_eval"]
    args = f"pretrained={exported},trust_remote_code=True,n_loops={R},exit={RULE['exit']}," \
           f"exit_threshold={RULE['exit_threshold']}"
    proc = subprocess.run([*command, "--model", "hf", "--model_args", args, "--tasks", "cartlab_mc",
                           "--include_path", "data/tasks", "--limit", "4", "--device", "cpu", "--batch_size", "2",
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          cwd=repo, env=no_cartlab_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [samples] = (tmp_path / "out").rglob("samples_cartlab_mc_*.jsonl")
    hf = {json.loads(line)["doc_id"]: [float(r[0][0]) for r in json.loads(line)["resps"]]
          for line in samples.read_text().splitlines()}
    assert len(hf) == 4

    def cartlab_scores(**rule):
        lm = CartlabLM(checkpoint=str(tiny_run.checkpoint), n_loops=R, **rule)
        out = lm_eval.simple_evaluate(model=lm, tasks=[local_tasks()["cartlab_mc"]], limit=4, log_samples=True,
                                      bootstrap_iters=0)["samples"]["cartlab_mc"]
        return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out}

    with_rule, fixed = cartlab_scores(**RULE), cartlab_scores()
    for doc, scores in hf.items():
        assert scores == pytest.approx(with_rule[doc], abs=1e-4)
    differ = [abs(a - b) for doc in hf for a, b in zip(hf[doc], fixed[doc])]
    assert max(differ) > 1e-2  # the exit rule changed the scores: lm-eval did not run every token R loops


def test_the_depth_profile_grid_of_an_export_is_its_checkpoints(exported, tiny_run):
    from cartlab.eval.cli import expand_loops

    assert expand_loops("profile", str(exported)) == expand_loops("profile", str(tiny_run.checkpoint))


def test_an_export_that_records_no_run_is_refused_with_a_database(exported, tiny_run, tmp_path, capsys):
    folder = tmp_path / "anonymous"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["cartlab_source"]
    (folder / "config.json").write_text(json.dumps(config))
    copy_db(tiny_run.db, tmp_path / "results.db")
    assert main(["eval", str(folder), "--tasks", "cartlab_mc", "--db", str(tmp_path / "results.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--db: {folder} records no run id" in err and len(err.splitlines()) == 1, err
