"""Pick what the hardware supports: device, precision, optimizer, torch.compile, attention kernel.

Every choice is a pure function of a `Capabilities` record, so the selection logic is tested on
a CPU by describing other machines. What was chosen (and why, when a request fell back) is
recorded with the run.

    auto on CUDA (bf16-capable) : bf16 autocast, bitsandbytes AdamW8bit, fused SDPA kernels
    auto on CPU                 : fp32, torch AdamW (bitsandbytes' 8-bit CPU path is ~3.5x slower),
                                  math/flash-CPU SDPA; bf16 autocast only when asked for
    compile                     : the whole model, or only its loop body when R varies per step
                                  (`compile_scope`)
"""
from __future__ import annotations

import importlib.util
import platform
from dataclasses import asdict, dataclass

import torch

from cartlab.hardware import PEAK_FLOPS, peak_flops  # noqa: F401 - the one table; read here by `select`

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    device_name: str
    bf16: bool
    bitsandbytes: bool
    triton: bool

    @classmethod
    def detect(cls) -> "Capabilities":
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            device_name=torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine()),
            bf16=torch.cuda.is_bf16_supported() if cuda else True,
            bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
            triton=importlib.util.find_spec("triton") is not None,
        )


@dataclass(frozen=True)
class Selection:
    device: str
    precision: str
    optimizer: str
    compile: bool
    device_name: str
    peak_flops: float | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes)}

    def autocast(self):
        """The autocast context for forward passes (a no-op context in fp32)."""
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def _check(field: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {list(allowed)}")


def select(caps: Capabilities, device: str = "auto", precision: str = "auto", optimizer: str = "auto",
           compile: bool = False, parallel: str = "ddp") -> Selection:
    """Resolve requested settings against capabilities. Explicit requests the hardware cannot
    honour are errors (asking for CUDA without a GPU); 'auto' falls back and says so. AdamW8bit
    keeps its state per whole tensor, so FSDP2's sharded parameters (parallel='fsdp') take torch
    AdamW."""
    _check("device", device, DEVICES)
    _check("precision", precision, PRECISIONS)
    _check("optimizer", optimizer, OPTIMIZERS)
    notes = []
    if device == "cuda" and not caps.cuda:
        raise ValueError("device='cuda' is not available on this machine (no CUDA GPU); use device='cpu' or 'auto'")
    dev = device if device != "auto" else ("cuda" if caps.cuda else "cpu")

    if precision == "auto":
        prec = "bf16" if dev == "cuda" and caps.bf16 else "fp32"
        if dev == "cpu":
            notes.append("precision auto -> fp32 on CPU (ask precision=bf16 for bf16 autocast)")
    else:
        if precision == "bf16" and not caps.bf16:
            raise ValueError(f"precision='bf16' is not supported by {caps.device_name}; use 'fp32' or 'auto'")
        prec = precision

    sharded = parallel == "fsdp"
    if optimizer == "auto":
        opt = "adamw8bit" if dev == "cuda" and caps.bitsandbytes and not sharded else "adamw"
        if dev == "cuda" and sharded:
            notes.append("parallel=fsdp: torch AdamW (bitsandbytes' AdamW8bit does not take sharded parameters)")
        elif dev == "cuda" and not caps.bitsandbytes:
            notes.append("bitsandbytes not installed: torch AdamW instead of AdamW8bit")
    else:
        if optimizer == "adamw8bit" and sharded:
            raise ValueError("optimizer='adamw8bit' does not take FSDP2's sharded parameters (parallel='fsdp'); "
                             "use optimizer='adamw' or 'auto', or parallel='ddp'")
        if optimizer == "adamw8bit" and not caps.bitsandbytes:
            raise ValueError("optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                             "use optimizer='adamw' or 'auto'")
        opt = optimizer
        if opt == "adamw8bit" and dev == "cpu":
            notes.append("AdamW8bit on CPU is ~3.5x slower than torch AdamW")

    use_compile = compile
    if compile and dev == "cuda" and not caps.triton:
        use_compile = False
        notes.append("torch.compile requested but triton is unavailable: running eager")
    name = caps.device_name if dev == "cuda" else f"cpu ({caps.device_name})"
    return Selection(dev, prec, opt, use_compile, name, peak_flops(caps.device_name) if dev == "cuda" else None,
                     tuple(notes))


def compile_scope(selection: Selection, loops_vary: bool = False) -> str:
    """What torch.compile wraps: 'none'; 'model', the whole forward as one graph; or 'loop' when
    the loop count varies per step (hook random_loops). Dynamo specialises a whole forward on its
    Python loop count, so it would trace one graph per R drawn (and run eagerly past its recompile
    limit); compiling the loop body instead (`CART.compile_loop`) traces graphs that do not depend
    on R."""
    if not selection.compile:
        return "none"
    return "loop" if loops_vary else "model"


def compiled(model: torch.nn.Module, selection: Selection, loops_vary: bool = False, **compile_kw):
    """What a training step calls, per `compile_scope`: `model` itself ('none'),
    `torch.compile(model)` ('model'), or `model` with its loop body compiled in place ('loop';
    `model` may be DDP-wrapped). `compile_kw` go to torch.compile (tests pass a CPU backend)."""
    scope = compile_scope(selection, loops_vary)
    if scope == "model":
        return torch.compile(model, **compile_kw)
    if scope == "loop":
        getattr(model, "module", model).compile_loop(**compile_kw)  # DDP keeps the model in .module
    return model


def build_optimizer(params, selection: Selection, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (norms, gates, mixer logits, LIE scale
    are not decayed), as torch AdamW or bitsandbytes AdamW8bit."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if selection.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=selection.device == "cuda")
