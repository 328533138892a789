"""Record (or recompute) the golden training trajectories of the refactor guard (issue 25):
the first 20 per-step training losses and a hash of the final weights of the `smoke` preset for
CART, Dense, Dense with `lrt_kv,lrt_residual` and CART with `random_loops,truncated_bptt`.

    python tests/golden/record.py tests/golden/smoke.json   # from the commit whose numbers are kept

`tests/test_golden.py` recomputes them with the same function and compares them bit for bit on a
machine like the one a recording was made on (`machine.py`), to a tolerance elsewhere. Each
machine kind gets its own recording: an existing OUT.json keeps the others' and gains (or
replaces) this machine's. The goldens were recorded from commit 7110054, the one before the
refactor (copy this folder into a worktree of it and run the script there).
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import identity  # noqa: E402

DENSE = {"kind": "dense", "vocab_size": 4096, "d_model": 64, "n_heads": 4, "n_layers": 4, "ffn_multiple_of": 64}
VARIANTS = {  # name -> (model section replacing the preset's, or None; overrides)
    "cart": (None, []),
    "dense": (DENSE, []),
    "lrt": (DENSE, ["model.hooks=lrt_kv,lrt_residual"]),
    "random_loops": (None, ["model.hooks=random_loops,truncated_bptt"]),
}
N_LOSSES = 20


def weights_hash(ckpt: Path) -> str:
    """sha256 over the checkpoint's tensors in name order (name, dtype, shape, bytes)."""
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def trajectory(variant: str, workdir: Path, data_dir: str | None = None) -> dict:
    """Train the smoke preset with `variant`'s overrides (one thread, per-step logging, no
    measures) and return its first N_LOSSES losses and final weights' hash."""
    import torch

    from cartlab import results
    from cartlab.checkpoint import latest
    from cartlab.train import TrainConfig, train
    from cartlab.train.config import preset_dict

    torch.set_num_threads(1)
    model, extra = VARIANTS[variant]
    base = preset_dict("smoke")
    if model is not None:
        base["model"] = dict(model)
    overrides = [*extra, "log_every=1", "measures=[]", "quiet=true", "device=cpu",
                 f"results_db={workdir / 'results.db'}", f"out_dir={workdir / 'runs'}"]
    if data_dir:
        overrides.append(f"data.dir={data_dir}")
    cfg = TrainConfig.from_dict(base, overrides)
    run_id = train(cfg)
    log = results.train_log(workdir / "results.db", [run_id]).sort_values("step")
    ckpt = latest(workdir / "runs" / run_id / "checkpoints")
    return {"run_id": run_id, "losses": [float(x) for x in log["loss"].head(N_LOSSES)],
            "weights_sha256": weights_hash(ckpt), "steps": int(log["step"].max())}


def main(out: str) -> None:
    here = identity()
    record = {"machine": here, "variants": {}}
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            record["variants"][variant] = trajectory(variant, Path(tmp))
            print(variant, record["variants"][variant]["losses"][:3], flush=True)
    path = Path(out)
    kept = json.loads(path.read_text())["recordings"] if path.exists() else []
    kept = [r for r in kept if r["machine"] != here]
    path.write_text(json.dumps({"recordings": kept + [record]}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
