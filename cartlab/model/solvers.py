"""Fixed-point solvers for CART's loop (hook `fixed_point`; issue 27).

With the hook, the shared core is not run R times: the forward solves h* = f(h*) for the loop map
f(h) = step([h, h, h], r = 0) (section 3.2 with every history slot at h, so the HyperConnection
blend returns h, and the loop-index embedding at r = 0), per token, and hands f(h*) to the coda.
The frozen anchor is f's only input, so each token is its own system of size d (the hook refuses
cores that read other tokens' states). After Deep Equilibrium Models (Bai et al. 2019) and the
Attractor models (jacobfa/Attractor, `attractor/models/attractor/solvers.py`):

    solver      iteration: x_{k+1} = f(x_k)
                anderson:  Anderson acceleration (Walker & Ni 2011) over the last `MEMORY`
                           iterates, x_{k+1} = sum_i alpha_i f(x_i) with alpha minimising
                           |sum_i alpha_i (f(x_i) - x_i)| under sum_i alpha_i = 1 (ridge `RIDGE`)
    backward    ift:       implicit differentiation: the gradient g reaching f(h*) is replaced by
                           the solution of g' = J^T g' + g (J = df/dh at h*), solved by the same
                           solver; memory holds one application of f, whatever the iteration count
                phantom:   k = `phantom_steps` steps of f from h* (detached) are backpropagated
                           through (Geng et al. 2021, unrolled phantom gradient; forward value f(h*))
                unrolled:  backpropagation through every solver iteration (memory grows with them)
    jacobian_penalty       weight of |J|_F^2 / d at h*, estimated with one Hutchinson probe
                           |eps^T J|^2, eps ~ N(0, I), added to the training loss

A token converges when |f(x) - x| / |f(x)| < solver_tol; from then on its point is frozen (masked
updates: the batch keeps iterating until every token has converged or solver_max_iter is
reached). Whether all have converged is asked of the device only every `CHECK_EVERY` iterations
on CUDA (every iteration on CPU, where it costs nothing), so the loop does not wait on the host.
`Stats` keeps, per token, the final residual, the iterations it took and whether it converged,
and the mean residual after every iteration (the residual curve of the convergence picture).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MEMORY = 5  # Anderson: iterates mixed
RIDGE = 1e-4  # Anderson: Tikhonov term of the least-squares problem (relative to its scale)
CHECK_EVERY = 8  # CUDA: iterations between host checks of "every token converged"
EPS = 1e-12

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Stats:
    """What one solve did, per row (token): residual (N,), iterations (N,), converged (N,) bool,
    and `curve` (K,), the mean residual over rows after each of the K iterations run."""

    residual: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    curve: torch.Tensor

    def summary(self) -> dict[str, float]:
        return {"residual": self.residual.float().mean().item(),
                "iterations": self.iterations.float().mean().item(),
                "converged": self.converged.float().mean().item()}


def relative_residual(fx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|f(x) - x| / |f(x)| per row: (N,)."""
    return (fx - x).norm(dim=-1) / fx.norm(dim=-1).clamp_min(EPS)


class Tracker:
    """Masked bookkeeping shared by the solvers: a row's point freezes when it converges."""

    def __init__(self, x0: torch.Tensor, tol: float, max_iter: int):
        n = x0.size(0)
        self.tol, self.max_iter = tol, max_iter
        self.point = x0
        self.done = torch.zeros(n, dtype=torch.bool, device=x0.device)
        self.residual = torch.full((n,), float("inf"), device=x0.device)
        self.iterations = torch.zeros(n, dtype=torch.long, device=x0.device)
        self.curve: list[torch.Tensor] = []
        self.check_every = CHECK_EVERY if x0.device.type == "cuda" else 1

    def visit(self, k: int, x: torch.Tensor, fx: torch.Tensor) -> bool:
        """Record iterate k (x, f(x)); True when the solve may stop (checked every `check_every`)."""
        res = relative_residual(fx.detach(), x.detach()).float()
        live = ~self.done
        self.point = torch.where(live[:, None], x, self.point)
        self.residual = torch.where(live, res, self.residual)
        self.iterations = self.iterations + live
        self.done = self.done | (res < self.tol)
        self.curve.append(self.residual.mean())
        return (k + 1) % self.check_every == 0 and bool(self.done.all())

    def stats(self) -> Stats:
        return Stats(self.residual, self.iterations, self.done, torch.stack(self.curve))


def iterate(f: Map, x0: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, Stats]:
    """Plain fixed-point iteration from x0 (N, d); returns the point (N, d) and its stats."""
    track = Tracker(x0, tol, max_iter)
    x = x0
    for k in range(max_iter):
        fx = f(x)
        if track.visit(k, x, fx):
            break
        x = fx
    return track.point, track.stats()


def anderson(f: Map, x0: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, Stats]:
    """Anderson acceleration from x0 (N, d), one small least-squares problem per row."""
    track = Tracker(x0, tol, max_iter)
    xs, fs = [], []  # the last MEMORY iterates and their images, (N, d) each
    x = x0
    for k in range(max_iter):
        fx = f(x)
        if track.visit(k, x, fx):
            break
        xs, fs = (xs + [x])[-MEMORY:], (fs + [fx])[-MEMORY:]
        x = mix(torch.stack(xs, 1), torch.stack(fs, 1)) if len(xs) > 1 else fx
    return track.point, track.stats()


def mix(X: torch.Tensor, FX: torch.Tensor) -> torch.Tensor:
    """Anderson's next iterate (N, d) from iterates X and their images FX (N, m, d), outside autocast."""
    with torch.autocast(X.device.type, enabled=False):  # autocast would run the small solve in bf16
        return _mix(X, FX)


def _mix(X: torch.Tensor, FX: torch.Tensor) -> torch.Tensor:
    """sum_i alpha_i FX_i with
    alpha = argmin |alpha G|, sum alpha = 1, G = FX - X (solved in closed form through the
    m x m Gram matrix with a ridge term)."""
    dtype = torch.promote_types(FX.dtype, torch.float32)  # fp32 at least: linalg has no bf16 solve
    G = (FX - X).to(dtype)  # (N, m, d)
    gram = G @ G.transpose(1, 2)  # (N, m, m)
    m = gram.size(-1)
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(EPS)[:, None, None]  # (N, 1, 1)
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    ones = torch.ones(gram.shape[:-1] + (1,), dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve_ex(gram + RIDGE * scale * eye, ones)[0]  # (N, m, 1); _ex: no error check, no host sync
    alpha = w / w.sum(1, keepdim=True)
    return (alpha.transpose(1, 2) @ FX.to(dtype))[:, 0].to(FX.dtype)  # (N, d)


SOLVERS = {"iteration": iterate, "anderson": anderson}
BACKWARDS = ("ift", "phantom", "unrolled")


@dataclass
class FixedPointResult:
    out: torch.Tensor
    """f(h*) (N, d), carrying the gradient the backward mode asked for."""
    stats: Stats
    penalty: torch.Tensor | None
    """The Hutchinson estimate of |J|_F^2 / d at h* (training with a penalty weight only)."""


def fixed_point(f: Map, x0: torch.Tensor, solver: str, tol: float, max_iter: int, backward: str = "ift",
                phantom_steps: int = 1, penalty: bool = False) -> FixedPointResult:
    """Solve x = f(x) from x0 (N, d) and return f(x*) with the gradient of `backward`."""
    solve = SOLVERS[solver]
    grad = torch.is_grad_enabled()
    if backward == "unrolled" or not grad:
        z, stats = solve(f, x0, tol, max_iter)  # with gradient through every iteration when enabled
        out = f(z)
    else:
        with torch.no_grad():
            z, stats = solve(f, x0, tol, max_iter)
        z = z.detach()
        if backward == "ift":
            out = f(z)
            if out.requires_grad:
                attach_implicit_gradient(f, z, out, solver, tol, max_iter)
        else:
            out = steps = f(z)
            for _ in range(phantom_steps - 1):
                steps = f(steps)
            out = steps + (out - steps).detach()  # the value f(x*), the gradient of k steps
    pen = jacobian_estimate(f, z.detach()) if penalty and grad else None
    return FixedPointResult(out, stats, pen)


def attach_implicit_gradient(f: Map, z: torch.Tensor, out: torch.Tensor, solver: str, tol: float,
                             max_iter: int) -> None:
    """Make the gradient g reaching out = f(z*) continue as the solution of g' = J^T g' + g (the
    implicit function theorem for z* = f(z*)), J = df/dz at z*. A second application of f at a
    detached copy of z* provides the vector-Jacobian products; only that one graph is kept."""
    z0 = z.detach().requires_grad_()
    with torch.enable_grad():
        f0 = f(z0)

    def hook(g: torch.Tensor) -> torch.Tensor:
        def adjoint(y: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(f0, z0, y, retain_graph=True)[0] + g

        with torch.enable_grad():
            solution, _ = SOLVERS[solver](adjoint, g, tol, max_iter)
        return solution.detach()

    out.register_hook(hook)


def jacobian_estimate(f: Map, z: torch.Tensor) -> torch.Tensor:
    """|J|_F^2 / d at z (N, d), mean over rows, from one Hutchinson probe: E|eps^T J|^2 = |J|_F^2."""
    z = z.detach().requires_grad_()
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        fz = f(z)
        eps = torch.randn_like(z)
        vjp = torch.autograd.grad(fz, z, eps, create_graph=True)[0]  # (N, d)
    return vjp.pow(2).sum(-1).mean() / z.size(-1)
