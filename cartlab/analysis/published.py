"""The paper's published tables (data/paper/*.csv) as results-schema frames.

    from cartlab.analysis.published import load_published, load_table
    res = load_published()            # Results(runs, train_log, eval_log, downstream)
    t7 = load_table("table7")         # the raw CSV
    import_published("runs/results.db")   # the same runs, into a results database

Every run is marked source="published" with seed NaN (the paper reports seed means); its
variant is a hash of its configuration columns (`schema.config_variant`), overrides "".
Mapping (paper section -> frames):
    Tables 1, 4 (sec. 3.5, 4.6) -> runs.stored_params / effective_params; train_log.tokens_per_s, mfu
    Table 6, 5 (sec. 5)         -> Stage-1 runs, eval_log at step 3,000 (wiki; Table 5 adds the
                                   other splits and rho_max for the best config per width)
    Tables 7, 9 (sec. 5.2, 7.1) -> Stage-2 runs, eval_log at step 30,500 (wiki from Table 7's
                                   3-decimal means, tinystories/fineweb from Table 9)
    Table 8 (sec. 6)            -> train_log.rho_max at step 30,500
    Tables 12-14 (sec. 7.4-7.5) -> downstream (accuracies as fractions, lm-eval style); the paper
                                   evaluated one seed whose id it does not give, attached here to
                                   the seed-mean run of that configuration
Published eval rows carry loss = ln(ppl).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cartlab.analysis.schema import (
    DOWNSTREAM_COLUMNS, EVAL_LOG_COLUMNS, RUNS_COLUMNS, TRAIN_LOG_COLUMNS, Results, empty, validate,
    with_variants,
)

STAGE1_STEPS, STAGE1_TOKENS_PER_STEP = 3_000, 16_384  # section 4.2
STAGE2_STEPS, STAGE2_TOKENS_PER_STEP = 30_500, 32_768  # section 4.3
STAGE1_TOKENS = STAGE1_STEPS * STAGE1_TOKENS_PER_STEP  # 49,152,000 ("49M")
STAGE2_TOKENS = STAGE2_STEPS * STAGE2_TOKENS_PER_STEP  # 999,424,000 ("1B")
STAGE2_SEEDS = 3
DENSE_7L_STORED_PARAMS = 123e6  # section 4.5, Table 3

TABLE_FILES = {
    "table1": "table1_params.csv",
    "table2": "table2_chinchilla.csv",
    "table3": "table3_flops.csv",
    "table4": "table4_throughput_rtx3090.csv",
    "table5": "table5_stage1_best.csv",
    "table6": "table6_stage1_ppl_wiki_by_R.csv",
    "table7": "table7_stage2_ppl_wiki_by_R.csv",
    "table8": "table8_spectral_radius.csv",
    "table9": "table9_stage2_final.csv",
    "table11": "table11_scaling.csv",
    "table12": "table12_variable_R_inference.csv",
    "table13": "table13_downstream.csv",
}

# Table 12/13 column -> (lm-eval task, metric, scale to the lm-eval unit)
_DOWNSTREAM = {
    "hellaswag_acc": ("hellaswag", "acc", 0.01),
    "arc_challenge_acc": ("arc_challenge", "acc", 0.01),
    "lambada_acc": ("lambada_openai", "acc", 0.01),
    "lambada_ppl": ("lambada_openai", "perplexity", 1.0),
    "piqa_acc": ("piqa", "acc", 0.01),
}


def paper_dir() -> Path:
    """Directory of the paper CSVs (sections 3.5-7): $CARTLAB_PAPER_DIR if set, else the shipped
    data/paper (the checkout's, or the installed package's copy)."""
    from cartlab import resources

    env = os.environ.get("CARTLAB_PAPER_DIR")
    path = Path(env) if env else resources.paper_dir()
    if not path.is_dir():
        raise ValueError(f"CARTLAB_PAPER_DIR: {path} is not a directory holding the paper CSVs")
    return path


def load_table(name: str) -> pd.DataFrame:
    """One published table as printed, by key ("table1" ... "table13"; see TABLE_FILES and the
    module docstring for each table's section)."""
    if name not in TABLE_FILES:
        raise ValueError(f"table: {name!r} unknown; allowed: {list(TABLE_FILES)}")
    return pd.read_csv(paper_dir() / TABLE_FILES[name])


def run_id(stage: str, model: str, d_model: int, *, prelude_layers=None, n_loops=None, n_layers=None) -> str:
    """Id of a published run: "paper/<stage>/cart-d<d>-P<P>-R<R>" or "paper/<stage>/dense-d<d>-L<L>"
    (stages of sections 4.2-4.3)."""
    if model == "cart":
        return f"paper/{stage}/cart-d{int(d_model)}-P{int(prelude_layers)}-R{int(n_loops)}"
    return f"paper/{stage}/dense-d{int(d_model)}-L{int(n_layers)}"


def load_published() -> Results:
    """All surviving paper tables (sections 3.5-7.5) as results-schema frames; the module
    docstring maps each table to its frame."""
    t1, t4, t5, t6, t7, t8, t9 = (load_table(f"table{i}") for i in (1, 4, 5, 6, 7, 8, 9))
    stored = t1.groupby("d_model")["stored_params_m"].first() * 1e6  # stored does not depend on R
    eff = pd.concat([t1[["d_model", "n_loops", "effective_params_m"]], t4[["d_model", "n_loops", "effective_params_m"]]])
    eff = eff.drop_duplicates(["d_model", "n_loops"]).set_index(["d_model", "n_loops"])["effective_params_m"] * 1e6

    runs, evals, trains = [], [], []

    def add_run(stage, model, d, P=np.nan, R=np.nan, L=np.nan, n_seeds=1, stored_p=np.nan, eff_p=np.nan):
        rid = run_id(stage, model, d, prelude_layers=P, n_loops=R, n_layers=L)
        runs.append(dict(
            run_id=rid, name=rid.split("/", 2)[2], source="published", model=model, d_model=int(d),
            prelude_layers=P, n_loops=R, n_layers=L, hooks="", seed=np.nan, n_seeds=n_seeds,
            stage=stage, stored_params=stored_p, effective_params=eff_p,
            tokens=STAGE1_TOKENS if stage == "stage1" else STAGE2_TOKENS, status="published",
        ))
        return rid

    def add_eval(rid, step, split, ppl):
        evals.append(dict(run_id=rid, step=step, split=split, loss=float(np.log(ppl)), ppl=float(ppl)))

    def params(d, P, R):
        if P != 6:  # Tables 1 and 4 are for P=6 only
            return np.nan, np.nan
        return stored.get(d, np.nan), eff.get((d, R), np.nan)

    # Stage 1 (section 5): Table 6 by R, Table 5 for the best config's other splits and radius.
    for row in t6.itertuples():
        rid = add_run("stage1", "cart", row.d_model, 6, row.n_loops, n_seeds=1,
                      stored_p=params(row.d_model, 6, row.n_loops)[0], eff_p=params(row.d_model, 6, row.n_loops)[1])
        add_eval(rid, STAGE1_STEPS, "wiki", row.ppl_wiki)
    for row in t5.itertuples():
        rid = run_id("stage1", "cart", row.d_model, prelude_layers=row.prelude_layers, n_loops=row.n_loops)
        add_eval(rid, STAGE1_STEPS, "tinystories", row.ppl_tinystories)
        add_eval(rid, STAGE1_STEPS, "fineweb", row.ppl_fineweb)
        trains.append(dict(run_id=rid, step=STAGE1_STEPS, rho_max=row.spectral_radius))

    # Stage 2 (section 7.1): Table 9, with Table 7's more precise wiki means.
    wiki7 = t7.set_index(["d_model", "n_loops"])["ppl_wiki_3seed_mean"]
    for row in t9.itertuples():
        if row.model == "cart":
            P, R = int(row.prelude_layers), int(row.n_loops)
            sp, ep = params(row.d_model, P, R)
            rid = add_run("stage2", "cart", row.d_model, P, R, n_seeds=int(row.seeds), stored_p=sp, eff_p=ep)
            wiki = wiki7.get((row.d_model, R), row.ppl_wiki) if P == 6 else row.ppl_wiki
        else:  # "dense_7l": the stored-parameter-matched Dense baseline (section 4.3)
            L = int(row.model.split("_")[1].rstrip("l"))
            rid = add_run("stage2", "dense", row.d_model, L=L, n_seeds=int(row.seeds),
                          stored_p=DENSE_7L_STORED_PARAMS, eff_p=DENSE_7L_STORED_PARAMS)
            wiki = row.ppl_wiki
        add_eval(rid, STAGE2_STEPS, "tinystories", row.ppl_tinystories)
        add_eval(rid, STAGE2_STEPS, "wiki", wiki)
        add_eval(rid, STAGE2_STEPS, "fineweb", row.ppl_fineweb)

    # Section 4.6 throughput and section 6 radius, one train_log row per Stage-2 run at the end.
    t48 = t4.merge(t8, on=["d_model", "n_loops"], how="outer")
    for row in t48.itertuples():
        trains.append(dict(
            run_id=run_id("stage2", "cart", row.d_model, prelude_layers=6, n_loops=row.n_loops),
            step=STAGE2_STEPS, rho_max=row.spectral_radius_3seed_mean_step30500,
            tokens_per_s=row.tokens_per_s, mfu=row.mfu,
        ))

    # Sections 7.4-7.5: downstream.
    down = []
    t12, t13 = load_table("table12"), load_table("table13")
    for row in t12.to_dict("records"):
        rid = run_id("stage2", "cart", 1024, prelude_layers=6, n_loops=int(row["trained_n_loops"]))
        down += _downstream_rows(rid, row, num_fewshot=0, n_loops=int(row["inference_n_loops"]))
    for row in t13.to_dict("records"):
        rid = run_id("stage2", "cart", row["d_model"], prelude_layers=6, n_loops=int(row["best_n_loops"]))
        down += _downstream_rows(rid, row, num_fewshot=int(row["num_fewshot"]), n_loops=int(row["best_n_loops"]))
    down = pd.DataFrame(down, columns=list(DOWNSTREAM_COLUMNS))
    # Table 13's d=1024 0-shot row repeats Table 12's R=6 row (rounded): keep Table 12's.
    down = down.drop_duplicates(["run_id", "task", "metric", "num_fewshot", "n_loops"], keep="first")

    res = Results(
        runs=with_variants(pd.DataFrame(runs, columns=list(RUNS_COLUMNS))),  # variant: its configuration columns
        train_log=pd.DataFrame(trains).reindex(columns=list(TRAIN_LOG_COLUMNS)).astype({"step": int}),
        eval_log=pd.DataFrame(evals, columns=list(EVAL_LOG_COLUMNS)),
        downstream=down.reset_index(drop=True),
        probes=empty("probes"),  # the paper published no per-model measurements
    )
    for table, frame in zip(Results._fields, res):
        validate(frame, table)
    return res


def _downstream_rows(rid: str, row: dict, *, num_fewshot: int, n_loops: int) -> list[dict]:
    return [
        dict(run_id=rid, task=task, metric=metric, value=row[col] * scale, stderr=np.nan,
             num_fewshot=num_fewshot, n_loops=n_loops, protocol="published")  # cartlab.eval.protocol.PUBLISHED
        for col, (task, metric, scale) in _DOWNSTREAM.items()
    ]


def import_published(path: str | os.PathLike) -> int:
    """Import the paper's tables (sections 3.5-7.5, `load_published`) into the results database
    `path` as runs with source='published' and status='published', next to local runs in one
    schema; idempotent. Returns the number of runs imported."""
    from cartlab.results.db import RUN_COLUMNS, ResultsDB

    pub = load_published()
    db = ResultsDB(path)
    try:
        cols = set(pub.runs.columns)
        for row in pub.runs.to_dict("records"):
            fields = {k: (None if pd.isna(v) else v) for k, v in row.items() if k != "run_id" and k in cols}
            fields = {k: (int(v) if isinstance(v, float) and v.is_integer() and k not in ("effective_params",) else v)
                      for k, v in fields.items()}
            fields["status"] = "published"
            fields["source"] = "published"
            fields.setdefault("name", row["run_id"])
            fields["config_json"] = json.dumps({"published": True})
            db.upsert_run(row["run_id"], **{k: v for k, v in fields.items() if k in RUN_COLUMNS})
        for rid, grp in pub.train_log.groupby("run_id"):
            db.log_train(rid, grp.drop(columns="run_id").to_dict("records"))
        for (rid, step), grp in pub.eval_log.groupby(["run_id", "step"]):
            db.log_eval(rid, int(step), {r["split"]: {"loss": r["loss"], "ppl": r["ppl"]} for r in grp.to_dict("records")})
        for rid, grp in pub.downstream.groupby("run_id"):
            db.log_downstream(rid, grp.to_dict("records"))
        return len(pub.runs)
    finally:
        db.close()
