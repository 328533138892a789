"""FSDP2 (issue 19, acceptance 4): `parallel=fsdp` on 2 gloo ranks on CPU follows DDP's loss over
20 steps within 1e-5 in fp32, writes torch.distributed.checkpoint checkpoints, and its checkpoint
resumes on 1 rank with the same global batch, continuing the same losses; a DDP run resumes
sharded. Plus what the sharded
path decides without ranks: the regrouping of a resume on another rank count, the optimizer
choice, the one-line refusals.
Run: pytest tests/test_fsdp.py
"""
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cartlab import results
from cartlab.checkpoint import is_sharded, latest, load_config
from cartlab.results.db import ResultsDB
from cartlab.train.device import Capabilities, select
from cartlab.train.loop import regroup
from test_train_engine import cli, overrides, torchrun
from train_helpers import tiny_config

STEPS = 20


def _run(cfg, ranks: int):
    if ranks == 1:
        r = cli("train", *overrides(cfg))
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stderr
    proc = torchrun("train", *overrides(cfg), log_dir=Path(cfg.out_dir) / "torchrun", stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def _losses(db):
    log = results.train_log(db).sort_values("step")
    return log.set_index("step").loss


@pytest.fixture(scope="module")
def fsdp_and_ddp(tiny_data, tmp_path_factory):
    """The same run on 2 gloo ranks twice, replicated (DDP) and sharded (FSDP2), 20 steps of 2
    sequences per rank, checkpoints at 10 and 20."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        cfg = tiny_config(tiny_data, root / parallel, steps=STEPS, batch_size=2, grad_accum=1, checkpoint_every=10,
                          eval_every=10, name="sharded", parallel=parallel)
        _run(cfg, ranks=2)
        runs[parallel] = cfg
    return root, runs


@pytest.mark.slow
def test_fsdp_follows_ddp_within_1e5_over_20_steps(fsdp_and_ddp):
    root, _ = fsdp_and_ddp
    ddp, fsdp = _losses(root / "ddp" / "results.db"), _losses(root / "fsdp" / "results.db")
    assert list(ddp.index) == list(fsdp.index) == list(range(1, STEPS + 1))
    assert (ddp - fsdp).abs().max() < 1e-5
    assert ddp.iloc[-1] < ddp.iloc[0] - 0.05  # it trained: the comparison is not of two flat lines
    hw = results.runs(root / "fsdp" / "results.db").hardware_json[0]
    assert '"parallel": "fsdp"' in hw and '"world_size": 2' in hw


def test_fsdp_checkpoints_are_distributed_checkpoints(fsdp_and_ddp):
    root, _ = fsdp_and_ddp
    ckpt = latest(root / "fsdp" / "sharded" / "checkpoints")
    assert ckpt.name == f"step_{STEPS:08d}" and is_sharded(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()
    assert not list(ckpt.parent.glob(".tmp_*"))  # no temporary folder left behind
    # the replicated run keeps its layout (safetensors, full optimizer state)
    assert not is_sharded(latest(root / "ddp" / "sharded" / "checkpoints"))


def test_a_sharded_checkpoint_loads_into_a_plain_model_with_the_same_weights(fsdp_and_ddp):
    """Eval and export read a sharded checkpoint like any other: the weights match DDP's."""
    import torch

    from cartlab.checkpoint import build

    root, _ = fsdp_and_ddp
    a, _ = build(latest(root / "fsdp" / "sharded" / "checkpoints"))
    b, _ = build(latest(root / "ddp" / "sharded" / "checkpoints"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5
    assert a.lm_head.weight is a.wte.weight and torch.equal(a.wte.weight, sa["wte.weight"])


@pytest.mark.slow
def test_a_two_rank_fsdp_checkpoint_resumes_on_one_rank(fsdp_and_ddp, tiny_data):
    """Kill the sharded run after its step-10 checkpoint (as a preempted job would be): resumed
    by one process, the run keeps its global batch (2 micro-batches of 2 instead of 2 ranks x 1)
    and continues the losses of the uninterrupted runs."""
    root, _ = fsdp_and_ddp
    out = _rewind(root, "fsdp", "resumed")
    db, ckpts = out / "results.db", out / "sharded" / "checkpoints"
    cfg = tiny_config(tiny_data, out, steps=STEPS, batch_size=2, grad_accum=1, checkpoint_every=10, eval_every=10,
                      name="sharded", parallel="fsdp")
    err = _run(cfg, ranks=1)
    assert "resuming sharded from step 10" in err and "1 ranks x 2 micro-batches" in err
    resumed, ddp = _losses(db), _losses(root / "ddp" / "results.db")
    assert list(resumed.index) == list(range(1, STEPS + 1))
    assert (resumed - ddp).abs().max() < 1e-5
    run = results.runs(db).iloc[0]
    assert run.status == "completed" and run.tokens == STEPS * 2 * 2 * 32  # the 2-rank run's global batch
    final = latest(ckpts)
    assert final.name == f"step_{STEPS:08d}" and not is_sharded(final)  # one process writes the plain layout
    assert load_config(final)["run_id"] == "sharded"


def _rewind(root, source: str, name: str):
    """A copy of run folder `source` as if its process had been killed after the step-10
    checkpoint: the step-20 checkpoint gone, the run marked interrupted at 10."""
    out = root / name
    shutil.copytree(root / source, out)
    shutil.rmtree(out / "sharded" / "checkpoints" / f"step_{STEPS:08d}")
    rdb = ResultsDB(str(out / "results.db"))
    rdb.set_status("sharded", "interrupted", "killed after the step-10 checkpoint", step=10)
    rdb.close()
    with sqlite3.connect(out / "results.db") as con:  # and no row of a step it had not reached
        for table in ("train_log", "eval_log", "probes"):
            con.execute(f"DELETE FROM {table} WHERE step > 10")
    con.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_run_resumes_under_the_other_parallel_mode_and_keeps_its_losses(fsdp_and_ddp, tiny_data, before, after):
    """`parallel` is operational: a run checkpointed by DDP (safetensors, full optimizer state)
    continues under FSDP2, its weights and AdamW moments sharded as they load; and back, the
    sharded checkpoint loads into DDP's full replica on each of 2 ranks."""
    root, _ = fsdp_and_ddp
    out = _rewind(root, before, f"{before}-then-{after}")
    cfg = tiny_config(tiny_data, out, steps=STEPS, batch_size=2, grad_accum=1, checkpoint_every=10, eval_every=10,
                      name="sharded", parallel=after)
    err = _run(cfg, ranks=2)
    assert "resuming sharded from step 10" in err
    resumed, ddp = _losses(out / "results.db"), _losses(root / "ddp" / "results.db")
    assert list(resumed.index) == list(range(1, STEPS + 1))
    assert (resumed - ddp).abs().max() < 1e-5
    assert is_sharded(latest(out / "sharded" / "checkpoints")) == (after == "fsdp")
    assert results.runs(out / "results.db").status[0] == "completed"


def test_regroup_keeps_the_global_batch_and_refuses_what_cannot_keep_it():
    two = [{"step": 6, "epoch": 0, "world_size": 2, "rank": r, "batch_size": 2} for r in range(2)]
    state, accum = regroup(two, run_world=2, rank=0, world=1, grad_accum=3, run_id="r")
    assert accum == 6 and state["step"] == 12 and state["world_size"] == 1 and state["rank"] == 0
    state, accum = regroup(two, run_world=2, rank=1, world=2, grad_accum=3, run_id="r")
    assert accum == 3 and state is two[1]
    # a run of 1 rank x 2 resumed on 2 ranks: one micro-batch each, the loader halfway
    state, accum = regroup({"step": 8, "world_size": 1, "rank": 0}, run_world=1, rank=1, world=2, grad_accum=2,
                           run_id="r")
    assert accum == 1 and state["step"] == 4 and state["rank"] == 1
    # after a resume on 1 rank, the run's own rank count still decides
    state, accum = regroup({"step": 8, "world_size": 1, "rank": 0}, run_world=2, rank=0, world=2, grad_accum=1,
                           run_id="r")
    assert accum == 1 and state["step"] == 4
    with pytest.raises(ValueError, match=r"cannot resume run 'r' on 4 ranks: its steps are 2 micro-batches"):
        regroup(two, run_world=2, rank=0, world=4, grad_accum=1, run_id="r")


def test_fsdp_selects_torch_adamw_and_refuses_adamw8bit():
    gpu = Capabilities(cuda=True, device_name="NVIDIA A100", bf16=True, bitsandbytes=True, triton=True)
    assert select(gpu).optimizer == "adamw8bit"
    sharded = select(gpu, parallel="fsdp")
    assert sharded.optimizer == "adamw" and any("fsdp" in n for n in sharded.notes)
    with pytest.raises(ValueError, match="adamw8bit.*sharded"):
        select(gpu, optimizer="adamw8bit", parallel="fsdp")


@pytest.mark.parametrize("args, message", [
    (["parallel=zero"], "parallel='zero' is not allowed"),
    (["parallel=fsdp", "optim.name=adamw8bit"], "parallel='fsdp' is not allowed: 'fsdp' needs optim.name="),
    (["parallel=fsdp", "model.hooks=fixed_point"],
     "parallel='fsdp' is not allowed: 'fsdp' cannot train the fixed point with model.backward='ift': "),
    (["parallel=fsdp", "model.hooks=fixed_point", "model.backward=phantom", "model.jacobian_penalty=0.1"],
     "'fsdp' cannot train the fixed point with model.jacobian_penalty=0.1: "),
])
def test_bad_parallel_settings_are_one_line(args, message, tmp_path):
    r = cli("train", "--preset", "smoke", f"results_db={tmp_path}/r.db", f"out_dir={tmp_path}", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r.db").exists()


def test_a_checkpoint_with_the_older_0d_loop_embedding_scale_still_loads(tmp_path):
    """FSDP2 shards no 0-d parameter, so the loop embedding's scale became a (1,) vector; weights
    saved while it was 0-d load into today's model with the same value."""
    import torch
    from safetensors.torch import save_file

    from cartlab.checkpoint import load_weights
    from cartlab.model import LMConfig, build_model
    from train_helpers import TINY_MODEL

    model = build_model(LMConfig.from_dict(TINY_MODEL))
    assert model.loop_embedding.scale.shape == (1,)
    old = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    old["loop_embedding.scale"] = torch.tensor(0.25)  # 0-d, as written before
    (tmp_path / "config.json").write_text("{}")
    save_file(old, str(tmp_path / "model.safetensors"))
    fresh = build_model(LMConfig.from_dict(TINY_MODEL))
    load_weights(tmp_path, fresh)
    assert fresh.loop_embedding.scale.tolist() == [0.25]


VARIANTS = {
    "dense": {"kind": "dense", "n_layers": 3, "prelude_layers": None, "n_loops": None},
    "lrt": {"kind": "dense", "n_layers": 3, "hooks": ["lrt_kv", "lrt_residual"], "prelude_layers": None,
            "n_loops": None},
    "lrt_paper with K/V refresh": {"kind": "dense", "n_layers": 3, "hooks": ["lrt_paper"], "memory_kv_refresh": True,
                                   "prelude_layers": None, "n_loops": None},
    "cart all ablations": {"hooks": ["unfreeze_kv", "unshare_core", "no_hyper", "no_lti", "no_lie"]},
    "cart self-attention core": {"hooks": ["self_attn_core"]},
    "cart random R, truncated BPTT": {"hooks": ["unshare_core", "random_loops", "truncated_bptt"],
                                      "n_loops": 4},
    # the backwards FSDP2 can run (the implicit one and the Jacobian penalty are refused: TrainConfig)
    "cart fixed point, phantom backward": {"hooks": ["fixed_point"], "solver_max_iter": 8, "backward": "phantom",
                                           "phantom_steps": 2},
    "cart fixed point, unrolled backward": {"hooks": ["fixed_point"], "solver_max_iter": 6, "backward": "unrolled"},
}


def _train_both(rank: int, port: int, out) -> None:
    """Spawned rank of 2: five AdamW steps of every variant under DDP and FSDP2 from the same
    init on the same batches (each rank its own), the rank-mean loss of every step kept."""
    import os

    import torch
    import torch.distributed as dist

    from cartlab.model import LMConfig, build_model
    from cartlab.train.loops import LoopSampler, idle_parameters
    from cartlab.train.parallel import STRATEGIES
    from train_helpers import TINY_MODEL

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for label, fields in VARIANTS.items():
        cfg = LMConfig.from_dict({k: v for k, v in {**TINY_MODEL, **fields}.items() if v is not None})
        loops = LoopSampler(cfg, seed=3) if hasattr(cfg, "n_loops") else None
        for parallel, strategy in STRATEGIES.items():
            torch.manual_seed(0)
            raw = build_model(cfg)
            s = strategy(2)
            model = s.wrap(raw, torch.device("cpu"), idle=idle_parameters(cfg))
            opt = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=3e-3)
            g = torch.Generator().manual_seed(rank)
            losses = []
            for step in range(5):
                x = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
                at = {"n_loops": loops(step)} if loops is not None and loops.varies else {}
                _, loss = model(x[:, :-1], x[:, 1:], **at)
                loss.backward()
                s.clip(model, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / 2)
            if rank == 0:
                out[(label, parallel)] = losses
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_follows_ddp_on_every_model_family_and_hook_combination():
    """Dense, LRT and CART with every ablation switched, the self-attention core, random R with
    truncated BPTT (parameters a step leaves without gradient) and the fixed-point loop with its
    phantom and unrolled backwards (ranks whose solves stop at different iterations) train the
    same under both."""
    import torch.multiprocessing as mp

    from test_train_engine import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_train_both, args=(int(free_port()), out), nprocs=2)
        losses = dict(out)
    for label in VARIANTS:
        ddp, fsdp = losses[(label, "ddp")], losses[(label, "fsdp")]
        assert max(abs(a - b) for a, b in zip(ddp, fsdp)) < 1e-5, (label, ddp, fsdp)


def test_fsdp_on_a_torch_without_fully_shard_is_one_line(monkeypatch):
    import torch.distributed.fsdp

    from cartlab.config import ConfigError
    from cartlab.train import TrainConfig

    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")  # torch 2.4-2.5 had it only as a private API
    with pytest.raises(ConfigError, match=r"^parallel='fsdp' is not allowed: 'fsdp' needs torch >= 2.6"):
        TrainConfig.from_preset("smoke", ["parallel=fsdp"])
    assert TrainConfig.from_preset("smoke").parallel == "ddp"  # DDP needs nothing more


def _save_with_rank0_failing(rank: int, port: int, folder: str, out) -> None:
    """Spawned rank of 2: a sharded save whose rank-0 part (state.pt, a full disk) fails."""
    import os
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import cartlab.train.checkpoint as ckpt
    from cartlab.model import LMConfig, build_model
    from cartlab.train.parallel import Sharded
    from train_helpers import TINY_MODEL

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = Sharded(2).wrap(build_model(LMConfig.from_dict(TINY_MODEL)), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    if rank == 0:
        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        ckpt._write_state = full_disk
    try:
        ckpt.save(Path(folder), 5, model, optimizer, [{}, {}], {}, keep=2, sharded=True, world=2)
        out[rank] = "saved"
    except Exception as err:  # noqa: BLE001 - what each rank saw is the result
        out[rank] = f"{type(err).__name__}: {err}"
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_sharded_save_that_fails_on_rank_0_fails_on_every_rank_and_leaves_nothing(tmp_path):
    """Rank 0 alone writes state.pt and renames the folder: when that fails the other ranks must
    not wait for it forever nor train on as if the checkpoint existed."""
    import torch.multiprocessing as mp

    from test_train_engine import free_port

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = int(free_port())
        procs = [ctx.Process(target=_save_with_rank0_failing, args=(r, port, str(tmp_path), out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        hung = [p.pid for p in procs if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        seen = dict(out)
    assert not hung, f"ranks still waiting: {hung}"
    assert seen[0].startswith(f"NoSpace: no space left on {tmp_path} (checkpoint of about ")  # says where
    assert seen[1] == "RuntimeError: the checkpoint of step 5 failed on rank 0"
    assert list(tmp_path.iterdir()) == []  # neither step_00000005 nor its temporary folder
