"""Evaluate a checkpoint with lm-evaluation-harness over few-shot settings and inference loop
counts, store every metric in the results database, and format the paper's Table 12 layout."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "data" / "tasks"


def local_tasks() -> dict[str, dict]:
    """The offline tasks of data/tasks/*.yaml as task configs with absolute data_files paths (the
    files name them relative to the repository root, where lm-eval's own CLI runs them)."""
    tasks = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((REPO / name).resolve())
        tasks[cfg["task"]] = cfg
    return tasks


def resolve_tasks(names: list[str]) -> list:
    """Local task names become their configs; other names must be tasks lm-eval knows (hub
    tasks such as hellaswag are used unchanged and need the internet or a cached dataset)."""
    from lm_eval.tasks import TaskManager

    local = local_tasks()
    known = None
    out = []
    for name in names:
        if name in local:
            out.append(local[name])
            continue
        if known is None:
            known = set(TaskManager().all_tasks)
        if name not in known:
            raise ValueError(f"--tasks: unknown task {name!r}; local tasks: {sorted(local)}, "
                             f"or any lm-eval task (lm-eval ls tasks)")
        out.append(name)
    return out


def metric_rows(results: dict, num_fewshot: int, n_loops: int) -> list[dict]:
    """simple_evaluate's results -> downstream rows (task, metric, value, stderr): metric names
    without lm-eval's filter suffix (",none"); stderr None where lm-eval reports "N/A"."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}" if _filter else f"{name}_stderr")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            rows.append({"task": task, "metric": name, "value": float(value), "stderr": stderr,
                         "num_fewshot": num_fewshot, "n_loops": n_loops})
    return rows


def evaluate(checkpoint: str | os.PathLike, tasks: list[str], *, num_fewshot=(0,), n_loops=(None,),
             db: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 1,
             device: str = "cpu", log=print) -> pd.DataFrame:
    """Run lm_eval.simple_evaluate for every (num_fewshot, n_loops) and store the metrics as
    downstream rows of the checkpoint's run in `db`. n_loops None means the trained R (stored as
    the trained value; 0 for Dense). Returns the rows as a DataFrame.

    The downstream table holds one value per (run, task, metric, shots, R): the run's final
    weights on whole tasks. So `limit` (a quick look at the first documents) and a checkpoint
    that is not the run's newest are evaluated and returned but never stored (said in `log`)."""
    import lm_eval

    from cartlab.checkpoint import latest
    from cartlab.eval.lm import CartlabLM, resolve_checkpoint
    from cartlab.results.db import ResultsDB

    for r in n_loops:
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"--n-loops: every value must be an integer >= 1, got {r!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    ckpt = resolve_checkpoint(checkpoint)
    task_list = resolve_tasks(list(tasks))
    if db is not None and not Path(db).is_file():
        raise ValueError(f"--db: {db} does not exist; give the database the checkpoint's run was trained into")
    lm = CartlabLM(checkpoint=str(ckpt), batch_size=batch_size, device=device)
    if any(r is not None for r in n_loops) and not lm.loops:
        raise ValueError("--n-loops: only CART checkpoints loop; this one is Dense")
    trained_r = getattr(lm.model.config, "n_loops", 0)
    store = None
    if db is not None:
        if limit is not None:
            log(f"cartlab eval: --limit {limit} evaluates part of each task; the metrics are printed, not stored")
        elif ckpt.resolve() != (latest(ckpt.parent) or ckpt).resolve():
            log(f"cartlab eval: {ckpt.name} is not the run's newest checkpoint; the metrics are printed, not stored")
        else:
            store = ResultsDB(db)
            if store.get_run(lm.run_id) is None:
                store.close()
                raise ValueError(f"--db: run {lm.run_id!r} of this checkpoint is not in {db}; "
                                 f"give the database it was trained into")
    rows = []
    try:
        for r in n_loops:
            lm.set_loops(r)
            for k in num_fewshot:
                log(f"cartlab eval: {lm.run_id} R={r or trained_r} {k}-shot on {', '.join(tasks)}")
                res = lm_eval.simple_evaluate(model=lm, tasks=task_list, num_fewshot=int(k), limit=limit,
                                              batch_size=batch_size, device=device, log_samples=False,
                                              bootstrap_iters=1000)
                new = metric_rows(res, int(k), int(r or trained_r))
                if store is not None:
                    store.log_downstream(lm.run_id, new)
                rows += new
    finally:
        if store is not None:
            store.close()
    frame = pd.DataFrame(rows, columns=["task", "metric", "value", "stderr", "num_fewshot", "n_loops"])
    frame.attrs["stored"] = store is not None
    return frame


def format_table(rows: pd.DataFrame) -> str:
    """Rows (task, metric) x columns (k-shot, R), "value +/- stderr", like the paper's Table 12."""
    if rows.empty:
        return "(no metrics)"
    cells = rows.assign(cell=[f"{v:.4f}" + (f" +/- {s:.4f}" if s == s and s is not None else "")
                              for v, s in zip(rows.value, rows.stderr)])
    table = cells.pivot_table(index=["task", "metric"], columns=["num_fewshot", "n_loops"], values="cell",
                              aggfunc="first")
    table.columns = [f"{k}-shot R={r}" if r else f"{k}-shot" for k, r in table.columns]  # R=0: Dense
    return table.to_string()
