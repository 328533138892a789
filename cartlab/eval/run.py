"""Evaluate a checkpoint with lm-evaluation-harness over few-shot settings and inference loop
counts, store every metric in the results database, and format the paper's Table 12 layout."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import pandas as pd
import yaml

from cartlab import resources

TASKS_DIR = resources.tasks_dir()
"""The offline tasks: the checkout's data/tasks, else the installed package's copy."""
TASKS_PREFIX = Path("data", "tasks")
"""How a task's data_files name its files: relative to the repository root, where lm-eval's own
CLI (`--include_path data/tasks`) runs them."""


def task_file(name: str) -> str:
    """The absolute path of a file a task's data_files names, relative to the repository root:
    in a checkout, that root; installed, `data/tasks/X` is X in the package's copy of the tasks
    (and any other relative name is taken relative to that folder)."""
    path = Path(name)
    repo = resources.checkout()
    if repo is not None:
        return str((repo / path).resolve())
    if path.is_absolute():
        return str(path.resolve())
    if path.parts[:len(TASKS_PREFIX.parts)] == TASKS_PREFIX.parts:
        path = path.relative_to(TASKS_PREFIX)
    return str((TASKS_DIR / path).resolve())


def local_tasks() -> dict[str, dict]:
    """The offline tasks of data/tasks/*.yaml as task configs with absolute data_files paths."""
    tasks = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = task_file(name)
        tasks[cfg["task"]] = cfg
    return tasks


def resolve_tasks(names: list[str]) -> list:
    """Local task names become their configs; other names must be tasks lm-eval knows (hub
    tasks such as hellaswag are used unchanged and need the internet or a cached dataset). Hub
    tasks whose datasets are not cached are refused at once when the hub cannot be reached
    (`hub_unreachable`), all of them named in one line, instead of after lm-eval's and datasets'
    retries."""
    from lm_eval.tasks import TaskManager

    local = local_tasks()
    manager = None
    out, missing = [], {}
    for name in names:
        if name in local:
            out.append(local[name])
            continue
        if manager is None:
            manager = TaskManager()
        if name not in set(manager.all_tasks):
            raise ValueError(f"--tasks: unknown task {name!r}; local tasks: {sorted(local)}, "
                             f"or any lm-eval task (lm-eval ls tasks)")
        uncached = [d for d in hub_datasets(manager, name) if not hub_dataset_cached(d)]
        if uncached:
            missing[name] = uncached[0]
        out.append(name)
    why = hub_unreachable() if missing else None
    if why:
        task, data = next(iter(missing.items()))
        what = (f"task {task!r} reads the Hugging Face hub dataset {data!r}, which is not cached," if len(missing) == 1
                else f"tasks {', '.join(f'{t!r} ({d})' for t, d in missing.items())} read Hugging Face hub datasets "
                     f"that are not cached,")
        raise ValueError(
            f"--tasks: {what} and {why}; use a local task ({', '.join(sorted(local))} "
            f"in {TASKS_DIR}), or point a task at local files: a YAML in {TASKS_DIR} with dataset_path: json and "
            f"dataset_kwargs.data_files naming the files (as cartlab_mc.yaml does), or run once online to cache "
            f"{data!r}")
    return out


def task_manager(task_list: list, model_args: str | None = None):
    """lm-eval's TaskManager for `task_list` (names and local configs, as `resolve_tasks` returns
    them), with `model_args` as the tasks' metadata, as simple_evaluate would make it. Local
    configs need no index of lm-eval's own tasks, which takes seconds to build for every
    evaluation: only a list naming an lm-eval task gets one."""
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    metadata = simple_parse_args_string(model_args) if model_args else {}
    return TaskManager(include_defaults=any(isinstance(t, str) for t in task_list), metadata=metadata)


LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder")
"""`dataset_path` values that read local files (`data_files`), not a hub dataset."""


def hub_datasets(manager, name: str, depth: int = 0) -> list[str]:
    """The Hugging Face hub datasets that lm-eval task, group or tag `name` reads (its subtasks'
    `dataset_path`s that are neither a local builder nor a local folder)."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return []
    cfg = getattr(entry, "cfg", None) or {}
    path = cfg.get("dataset_path")
    if path:
        local = path in LOCAL_BUILDERS or Path(path).expanduser().exists()
        return [] if local else [path]
    subtasks = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    if not subtasks and "tag" in str(getattr(entry, "kind", "")).lower():  # a tag: every task carrying it
        subtasks = [n for n, e in manager.task_index.items() if name in (getattr(e, "tags", None) or ())]
    found = []
    for sub in subtasks:
        if isinstance(sub, str):
            found += [d for d in hub_datasets(manager, sub, depth + 1) if d not in found]
    return found


def hub_dataset_cached(path: str) -> bool:
    """Whether hub dataset `path` (e.g. Rowan/hellaswag) has been downloaded before: in the hub's
    cache or in datasets' (where `datasets` offline mode finds it)."""
    import datasets.config
    import huggingface_hub.constants

    return ((Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}").exists()
            or (Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___")).exists())


RESOLVE_TIMEOUT = 3.0
"""Seconds to wait for the hub's host name to resolve before taking the machine for offline."""


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it may be: an offline switch
    (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, ...), or the hub's own host name (HF_ENDPOINT's) not
    resolving. Nothing is sent to any host; behind a proxy the name is not checked."""
    import socket
    import threading
    import urllib.parse

    from cartlab.data.hub import OFFLINE_SWITCHES, is_offline

    if is_offline():
        on = [v for v in OFFLINE_SWITCHES if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
        return f"{on[0]} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import huggingface_hub.constants

    host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    answer: list = []

    def resolve():
        try:
            answer.append(bool(socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)))
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(RESOLVE_TIMEOUT)
    if answer and answer[0]:
        return None
    return f"the hub's host {host} cannot be resolved (no network?)"


def metric_rows(results: dict, num_fewshot: int, n_loops: int, protocol: dict | None = None) -> list[dict]:
    """simple_evaluate's results -> downstream rows (task, metric, value, stderr): metric names
    without lm-eval's filter suffix (",none"); stderr None where lm-eval reports "N/A". With
    `protocol` (`Protocol.row()`), each row carries it and its task's version and config hash."""
    from cartlab.eval.protocol import task_fingerprint

    rows = []
    for task, metrics in results["results"].items():
        version, digest = task_fingerprint(results, task)
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}" if _filter else f"{name}_stderr")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            rows.append({**(protocol or {}), "task": task, "metric": name, "value": float(value), "stderr": stderr,
                         "num_fewshot": num_fewshot, "n_loops": n_loops, "task_version": version,
                         "task_hash": digest})
    return rows


def exit_name(exit: str | None, exit_threshold: float | None) -> str:
    """How a protocol names the loop's end: "fixed" (every token runs R loops), or the per-token
    exit rule with the threshold as used ("kl:0.001": the rule's default when none is given)."""
    from cartlab.model.exits import EXITS, exit_rule

    if exit is None:
        return "fixed"
    exit_rule(exit, exit_threshold)  # one-line refusal of a bad rule or threshold
    return f"{exit}:{EXITS[exit](exit_threshold).threshold:g}"


def evaluate(checkpoint: str | os.PathLike, tasks: list[str], *, num_fewshot=(0,), n_loops=(None,),
             db: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 1,
             device: str = "auto", output_path: str | os.PathLike | None = None, log_samples: bool = False,
             fewshot_seed: int = 1234, system_prompt: str | None = None, quiet: bool = False,
             exit: str | None = None, exit_threshold: float | None = None, log=print) -> pd.DataFrame:
    """Run lm_eval.simple_evaluate for every (num_fewshot, n_loops) and store the metrics as
    downstream rows of the checkpoint's run in `db`, each with the protocol that produced it
    (`cartlab.eval.protocol.Protocol`: few-shot count and seed, system prompt, batch size, limit,
    dtype, loop count and exit rule, checkpoint step, lm-eval's version; the task's version and
    config hash). n_loops None means the trained R (stored as the trained value; 0 for Dense).
    Returns the rows as a DataFrame.

    Every (task, few-shot count) and every R is checked before anything is evaluated (`preflight`),
    so an impossible setting fails at once, in one line naming it, not after hours of the others.
    `device` 'auto' picks what the hardware supports, as training does. With `output_path`, each
    setting's results (and with `log_samples` its per-document samples) are written as lm-eval
    writes them: results_<time>.json and samples_<task>_<time>.jsonl in a folder named after the
    checkpoint path (`pretrained=`; `lm_eval.loggers.EvaluationTracker`). `quiet` silences
    lm-eval's log and every progress bar.

    A quick look (`limit`) or an earlier checkpoint is stored too, under its own protocol (the
    limit and the step are part of it), so it never stands in for the final weights on whole
    tasks: a score table gives each protocol its own column (`protocol.score_table`).

    With `exit` (a rule of `cartlab.model.exits`, and `exit_threshold`) each token of a CART
    model stops by that rule after at most R loops; the rule is part of the protocol, every task is
    evaluated on its own and gets one more row, metric "loops_per_token": the mean loops per scored
    token.

    `checkpoint` may also be a folder `cartlab export` wrote: lm-eval's own hf model scores it
    (`cartlab.eval.exported.ExportLM`), and its rows are stored as the checkpoint's would be, under
    the run and step its config.json records, the mean loops per token counted the same way."""
    import lm_eval

    from cartlab.checkpoint import latest, step_of
    from cartlab.eval.lm import CartlabLM, is_export, resolve_checkpoint, resolve_device
    from cartlab.eval.protocol import NONE, Protocol
    from cartlab.results.db import ResultsDB

    for r in n_loops:
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"--n-loops: every value must be an integer >= 1, got {r!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    if log_samples and output_path is None:
        raise ValueError("--log-samples: the samples are written under --output-path; give one")
    exported = is_export(checkpoint)  # an export folder: scored by lm-eval's hf model (`cartlab.eval.exported`)
    ckpt = None if exported else resolve_checkpoint(checkpoint)
    task_list = resolve_tasks(list(tasks))
    if db is not None and not Path(db).is_file():
        raise ValueError(f"--db: {db} does not exist; give the database the checkpoint's run was trained into")
    device = resolve_device(device)
    if exported:
        from cartlab.eval.exported import ExportLM

        lm = ExportLM(checkpoint, batch_size=batch_size, device=device, quiet=quiet)
        step = lm.step
    else:
        lm = CartlabLM(checkpoint=str(ckpt), batch_size=batch_size, device=device, quiet=quiet)
        step = step_of(ckpt)
        step = -1 if step is None else step
    ending = exit_name(exit, exit_threshold)
    if exit is not None and not lm.loops:
        raise ValueError(f"--exit: only looping checkpoints stop per token; this one is {lm.core.config.kind}")
    preflight(lm, task_list, n_loops=n_loops, num_fewshot=num_fewshot)
    trained_r = getattr(lm.core.config, "n_loops", 0)
    store = None
    if db is not None:
        if limit is not None:
            log(f"cartlab eval: --limit {limit} evaluates part of each task; stored under a protocol that says so")
        if ckpt is not None and ckpt.resolve() != (latest(ckpt.parent) or ckpt).resolve():
            log(f"cartlab eval: {ckpt.name} is not the run's newest checkpoint; stored under its step ({step})")
        if lm.run_id is None:
            raise ValueError(f"--db: {checkpoint} records no run id (config.json's cartlab_source), so its scores "
                             f"cannot be stored; export the checkpoint again")
        store = ResultsDB(db)
        if store.get_run(lm.run_id) is None:
            store.close()
            raise ValueError(f"--db: run {lm.run_id!r} of this checkpoint is not in {db}; "
                             f"give the database it was trained into")
    dtype = str(next(lm.core.parameters()).dtype).removeprefix("torch.")
    rows = []
    groups = [[t] for t in task_list] if exit else [task_list]  # with an exit rule: each task's own loop count
    settings = [(r, int(k), group) for r in n_loops for k in num_fewshot for group in groups]
    try:
        for r, k, group in settings:
            lm.set_loops(r, exit, exit_threshold)
            protocol = Protocol(lm_eval_version=lm_eval.__version__, num_fewshot=k, fewshot_seed=int(fewshot_seed),
                                chat_template=NONE, system_prompt=system_prompt or NONE, batch_size=int(batch_size),
                                limit_docs=None if limit is None else float(limit), dtype=dtype,
                                n_loops=int(r or trained_r), exit_rule=ending, step=step)
            log(f"cartlab eval: {lm.run_id} R={r or trained_r} exit {ending} {k}-shot on {', '.join(tasks)} "
                f"({device}{', exported model: lm-eval hf' if exported else ''})")
            tracker = tracker_for(output_path)
            with silenced(quiet):
                args = model_args(checkpoint, r)
                res = lm_eval.simple_evaluate(model=lm, model_args=args, tasks=group,
                                              task_manager=task_manager(group, args), num_fewshot=k, limit=limit, batch_size=batch_size, device=device,
                                              log_samples=log_samples, evaluation_tracker=tracker,
                                              bootstrap_iters=1000, fewshot_random_seed=int(fewshot_seed),
                                              system_instruction=system_prompt)
            if tracker is not None:
                write_outputs(tracker, res, log_samples)
            new = metric_rows(res, k, int(r or trained_r), protocol.row())
            if exit:
                new += [{**protocol.row(), "task": task, "metric": "loops_per_token", "value": lm.mean_loops(),
                         "stderr": None, "num_fewshot": k, "n_loops": int(r or trained_r)} for task in res["results"]]
            if store is not None:
                store.log_downstream(lm.run_id, new)
            rows += new
    finally:
        if store is not None:
            store.close()
    frame = pd.DataFrame(rows, columns=["task", "metric", "value", "stderr", "num_fewshot", "n_loops", "protocol"])
    frame.attrs["stored"] = store is not None
    return frame


@contextlib.contextmanager
def silenced(quiet: bool):
    """With `quiet`, lm-eval's log below errors and its context-building bar off for the block
    (that bar has no switch of its own: lm_eval.api.task's tqdm is given `disable=True`)."""
    if not quiet:
        yield
        return
    import logging

    import lm_eval.api.task as task_module

    logger, bar = logging.getLogger("lm_eval"), task_module.tqdm
    level = logger.level
    logger.setLevel(logging.ERROR)
    task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        task_module.tqdm = bar


def preflight(lm, task_list: list, *, n_loops, num_fewshot) -> None:
    """Refuse, before anything is evaluated, an R the model cannot run (`check_loops`: e.g. more
    loops than an unshared core has blocks) and a few-shot count a task cannot build (more examples
    than its few-shot documents), in one line naming the R or the task and what is allowed."""
    from cartlab.model.family import looping

    wanted = [r for r in n_loops if r is not None]
    if wanted and not lm.loops:
        raise ValueError(f"--n-loops: only {looping()} checkpoints loop; this one is {lm.core.config.kind}")
    for r in wanted:
        try:
            lm.core.check_loops(r)
        except ValueError as err:
            raise ValueError(f"--n-loops: R={r} cannot run on this checkpoint: {err}") from None
    shots = sorted({int(k) for k in num_fewshot if int(k) > 0})
    if not shots:
        return
    for name, task in task_manager(task_list).load(task_list)["tasks"].items():  # every task, groups flattened
        doc = next(iter(task.eval_docs), None)
        if builds_context(task, doc, shots[-1]):
            continue
        docs = task.fewshot_docs()
        n_docs = 0 if docs is None else len(docs)
        most = next((k for k in (n_docs, n_docs - 1) if k >= 0 and builds_context(task, doc, k)), 0)
        raise ValueError(f"--num-fewshot: {shots[-1]} examples cannot be drawn for task {name!r}, which has "
                         f"{n_docs} few-shot documents; allowed: 0..{most}")


def builds_context(task, doc, k: int) -> bool:
    """Whether lm-eval can build a k-shot prompt for `doc` of `task` (its own sampler decides whether
    the evaluated document is left out of the examples)."""
    if k == 0:
        return True
    if doc is None:
        return False
    try:
        task.fewshot_context(doc=doc, num_fewshot=k)
    except (ValueError, AssertionError, IndexError):  # random.sample: "Sample larger than population"
        return False
    return True


def model_args(checkpoint: str | os.PathLike, n_loops: int | None) -> str:
    """lm-eval's --model_args for this evaluation: `pretrained=` names the output folder."""
    return f"pretrained={checkpoint}" + (f",n_loops={n_loops}" if n_loops is not None else "")


def tracker_for(output_path: str | os.PathLike | None):
    """lm-eval's EvaluationTracker writing under `output_path` (None: nothing is written)."""
    if output_path is None:
        return None
    from lm_eval.loggers import EvaluationTracker

    return EvaluationTracker(output_path=str(output_path))


def write_outputs(tracker, results: dict, log_samples: bool) -> None:
    """The results file, and the samples files, as lm-eval's CLI writes them."""
    samples = results.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in (results["configs"] if samples else []):
        tracker.save_results_samples(task_name=task, samples=samples[task])


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
