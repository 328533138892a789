"""Probes inside CART's loop (issue 15): what each loop's state predicts, and how strongly one
loop step contracts.

    from cartlab.model.probes import logit_lens, loop_contraction, mean_settle_loop
    rows = logit_lens(model, x, y)              # one row per loop: loss, KL to final, top-1 agreement
    rows = loop_contraction(model, x, seed=0)   # one row per loop: |eigenvalue| and norm of dh_{r+1}/dh_r

Both take a batch `idx` (B, T); evaluate them once per validation domain and average the rows.

**The loop map.** One loop step (`CART.step`, section 3.2) is

    x_r     = sum_i w_i h_{r-i}                       # mixer: HyperConnection (3 states) or last (w_0 = 1)
    h_{r+1} = A x_r + u_r(x_r + LIE(r))               # LTI gate (A = diag sigmoid(lambda); A = I without it)

`loop_maps` gives, for each loop r, the function f_r: h_r -> h_{r+1} with the older states
h_{r-1}, h_{r-2}, the anchor's K, V and the rotary angles held fixed, so f_r(h_r) is exactly the
forward pass's h_{r+1}. `loop_contraction` estimates, at sampled tokens t, the spectral radius and
the operator 2-norm of the d x d block

    J_r[t] = d h_{r+1}[t] / d h_r[t] = w_0 (A + d u_r[t] / d x_r[t]),

the Jacobian of the loop step at one token with everything else fixed. This is the quantity that
compares with the gate's radius max_c A_c (`CART.spectral_radius`, section 6): that radius is the
radius of J's linear part A alone (up to w_0 ~ 0.987), while J adds what the core's update does.

Why the per-token block is the whole story. The full Jacobian of f_r over all B*T positions has
blocks d h_{r+1}[s] / d h_r[t]. With the frozen anchor (CART) the core reads other positions only
through K, V computed once from the prelude, so every off-diagonal block is exactly zero and the
full Jacobian is block diagonal. With a state-dependent K, V (`unfreeze_kv`, `self_attn_core`)
position s also reads h_r[t] for t < s (causal attention), so the Jacobian is block lower
triangular. In both cases its eigenvalues are the union of the diagonal blocks' eigenvalues, and
the radius of the whole loop step is the max over tokens of the per-token radii. The exception is
`unfreeze_kv` together with `noncausal_cross_attn`: position s also reads later positions, the
Jacobian is no longer triangular, and the per-token radius describes the diagonal blocks only
(each row reports `cross_token`, whether other positions depend on h_r[t] at all).
The older states enter linearly through the mixer (d h_{r+1} / d h_{r-i} = w_i M with the same
M = A + du/dx), so the history-held-fixed block is the one that decides convergence up to the
small weights w_1, w_2 ~ 0.007.

**Estimation.** Products J v and J^T u at many tokens at once, from one `torch.func.vjp` of f_r
per loop: J^T u is the vjp, J v the vjp of that (linear) vjp (the transpose trick that
`torch.autograd.functional.jvp` uses; here ~10x cheaper than forward mode, whose pass recomputes
the primal and whose CPU attention kernel lacks forward-mode AD). Attention runs on the math
SDPA backend inside the probe, since the fused CPU kernel has no double backward. When f_r is
token-local (checked exactly each loop: a tangent at position 0 must leave every other position
exactly zero), all sampled tokens share one product; otherwise each product is split into rounds
with at most one sampled token per sequence, which keeps every per-token product exact.

The radius comes from power iteration that keeps and orthogonalises its sequence of iterates
(Arnoldi): the same products J v, but the largest |eigenvalue| is read from the Krylov space they
span, which also resolves a complex-conjugate pair or a cluster at the top that makes plain power
iteration oscillate or stall. The norm is sqrt of the top eigenvalue of J^T J by the same
iteration (there it is Lanczos: a lower bound that rises to ||J||_2). Both stop after `n_iter`
products or when every token's estimate moved by less than `tol` (relative) in one iteration;
the start vectors and the sampled tokens come from a torch.Generator seeded with `seed`, so a
call is deterministic.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cartlab.model.cart import CART
from cartlab.model.components import LoopContext
from cartlab.model.layers import upcast

LoopMap = Callable[[torch.Tensor], torch.Tensor]


def _cart(model, what: str) -> CART:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, CART):
        raise ValueError(f"{what} needs a CART model (a recurrent core to look inside); got "
                         f"{type(model).__name__}, which has no loops")
    return model


# -- the loop map ----------------------------------------------------------------------------------------
@torch.no_grad()
def loop_maps(model, idx: torch.Tensor, n_loops: int | None = None) -> list[tuple[torch.Tensor, LoopMap]]:
    """For r = 0..R-1: (h_r, f_r), with h_r (B, T, d) the state entering loop r (h_0 = prelude
    output) and f_r the loop step h_r -> h_{r+1} with the older states, the anchor's K, V and the
    rotary angles held at their values in this forward pass. f_r(h_r) is exactly the forward's
    h_{r+1}; f_r can be differentiated (`torch.func`), h_r cannot (it is computed without grad)."""
    model = _cart(model, "loop_maps")
    n = model.check_loops(n_loops)
    e, rope = model.encode(idx)  # (B, T, d)
    anchor = model.anchor.begin(e, None)
    history = [e] * model.mixer.depth  # h_r, h_{r-1}, ... as in CART.recur
    out = []
    for r in range(n):
        def f(h: torch.Tensor, r=r, older=tuple(history[1:])) -> torch.Tensor:
            return model.step([h, *older], LoopContext(r, rope, None, anchor))

        out.append((history[0], f))
        history = [f(history[0])] + history[:-1]
    return out


# -- the logit lens ----------------------------------------------------------------------------------------
@torch.no_grad()
def logit_lens(model, idx: torch.Tensor, targets: torch.Tensor | None = None,
               n_loops: int | None = None) -> list[dict]:
    """Decode every loop's state h_r through the coda and the LM head, as the forward pass decodes
    the last one. Returns one row per loop r = 1..R (the state after r loops):

        loop         r
        loss         mean next-token cross-entropy of head(coda(h_r)) (only with `targets`; -1 ignored)
        kl_to_final  mean over tokens of KL(p_R || p_r) = sum_v p_R log(p_R / p_r), in nats: what is
                     lost by stopping at loop r instead of R (0 at r = R)
        top1_agree   share of tokens whose top-1 token at loop r is the final one
        settled      share of tokens whose top-1 has settled by loop r: it equals the final top-1 at
                     r and at every later loop (1 at r = R). `mean_settle_loop(rows)` turns this
                     column into the mean settle loop.

    The row of the last loop is computed by the very calls `CART.forward` makes, so its logits
    equal the model's own logits exactly (and its loss the model's loss). `n_loops` overrides R
    (variable-R inference); a Dense model raises ValueError."""
    model = _cart(model, "logit_lens")
    states: list[torch.Tensor] = []
    e, rope = model.encode(idx)
    model.recur(e, rope, n_loops, observe=lambda r, h, prev: states.append(h))

    def decode(h: torch.Tensor):
        return model.head(model.coda(h, rope, None), targets)  # logits (B, T, V), loss

    R = len(states)
    final = decode(states[-1])  # exactly CART.forward's logits and loss
    logp_final = F.log_softmax(upcast(final[0]), dim=-1)  # (B, T, V)
    p_final = logp_final.exp()
    top1_final = final[0].argmax(dim=-1)  # (B, T)
    stable = torch.ones_like(top1_final, dtype=torch.bool)  # top-1 equals the final one from r on
    rows = []
    for r in range(R, 0, -1):  # backwards, so "settled" is a running AND
        logits, loss = final if r == R else decode(states[r - 1])
        logp = F.log_softmax(upcast(logits), dim=-1)
        agree = logits.argmax(dim=-1) == top1_final
        stable &= agree
        row = {"loop": r}
        if targets is not None:
            row["loss"] = loss.item()
        row["kl_to_final"] = (p_final * (logp_final - logp)).sum(-1).mean().item()
        row["top1_agree"] = agree.float().mean().item()
        row["settled"] = stable.float().mean().item()
        rows.append(row)
    return rows[::-1]


def mean_settle_loop(rows: list[dict]) -> float:
    """Mean over tokens of the settle loop (the first loop from which the top-1 token never
    changes), from `logit_lens` rows: E[S] = sum_{r=1..R} P(S >= r) = 1 + sum_{r<R} (1 - settled_r).
    Exact for one batch, and for rows averaged over equal-sized batches."""
    settled = [row["settled"] for row in sorted(rows, key=lambda row: row["loop"])]
    return 1.0 + sum(1.0 - s for s in settled[:-1])


# -- the loop map's contraction --------------------------------------------------------------------------
def loop_contraction(model, idx: torch.Tensor, n_loops: int | None = None, n_tokens: int = 64, n_iter: int = 30,
                     tol: float = 1e-3, seed: int = 0, per_token: bool = False) -> list[dict]:
    """Spectral radius and operator 2-norm of the per-token loop Jacobian J_r[t] = d h_{r+1}[t] /
    d h_r[t] (history and anchor held fixed; see the module docstring for why this block) at
    `n_tokens` tokens of `idx` sampled without replacement. One row per loop r = 1..R (the step
    that produces h_r):

        loop          r
        radius_mean   mean over the sampled tokens of rho(J) = max |eigenvalue|
        radius_max    max over them: the radius of the whole loop step (module docstring)
        norm_mean     mean of ||J||_2 (>= rho(J)); > 1 means some direction grows in one step
        norm_max
        gate_radius   the gate's radius max_c A_c (`CART.spectral_radius()["max"]`; 1 without the
                      LTI gate), the linear part of J
        cross_token   whether h_{r+1} at other positions depends on h_r[t] (False for the frozen anchor)
        iters         products used by the radius iteration (<= n_iter)

    With `per_token`, rows also hold `tokens` (K, 2) [sequence, position], `radius` (K,) and
    `norm` (K,). Deterministic given `seed`; runs in fp32 with autocast off. Cost per loop: one
    vjp of the loop step and up to 3 * n_iter products, each the price of about one loop step on
    `idx` (cpu-demo size, B=8, T=128, R=4: 0.6 s in all). When `cross_token`, every product is
    repeated once per sampled token of the busiest sequence (~n_tokens / B times: 16 s there), so
    for `unfreeze_kv` / `self_attn_core` pass n_tokens=B, or fewer sequences. A Dense model raises
    ValueError."""
    model = _cart(model, "loop_contraction")
    if n_tokens < 1 or n_iter < 1 or not tol >= 0:
        raise ValueError(f"n_tokens={n_tokens}, n_iter={n_iter}, tol={tol}: need n_tokens >= 1, n_iter >= 1, tol >= 0")
    B, T = idx.shape
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(B * T, generator=gen)[: min(n_tokens, B * T)].sort().values
    tokens = torch.stack([flat // T, flat % T], dim=1)  # (K, 2): sequence, position
    starts = torch.randn(2, len(flat), model.config.d_model, generator=gen, dtype=torch.float64)  # radius, norm
    gate = model.spectral_radius()["max"]
    rows = []
    weights = [p for p in model.parameters() if p.requires_grad]
    try:  # differentiate with respect to the state only: no graph back to the weights
        for p in weights:
            p.requires_grad_(False)
        with torch.enable_grad(), torch.autocast(idx.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
            for r, (h, f) in enumerate(loop_maps(model, idx, n_loops)):
                J, Jt, cross = _token_products(f, upcast(h), tokens)
                radius, iters = _top_ritz(J, starts[0], n_iter, tol)
                norm = _top_ritz(lambda v: Jt(J(v)), starts[1], n_iter, tol)[0].sqrt()
                row = {"loop": r + 1, "radius_mean": radius.mean().item(), "radius_max": radius.max().item(),
                       "norm_mean": norm.mean().item(), "norm_max": norm.max().item(), "gate_radius": gate,
                       "cross_token": cross, "iters": iters}
                if per_token:
                    row.update(tokens=tokens, radius=radius, norm=norm)
                rows.append(row)
    finally:
        for p in weights:
            p.requires_grad_(True)
    return rows


def _token_products(f: LoopMap, h: torch.Tensor, tokens: torch.Tensor):
    """v -> J_t v and u -> J_t^T u for the per-token blocks at `tokens` (K, 2), both (K, d) -> (K, d)
    in fp64, from one vjp of f at h; and whether f couples positions (`cross_token`)."""
    out, vjp_fn = torch.func.vjp(f, h)
    _, jvp_fn = torch.func.vjp(vjp_fn, torch.zeros_like(out))  # J v as the vjp of the (linear) vjp
    full = {"J": lambda V: jvp_fn((V,))[0], "Jt": lambda U: vjp_fn(U)[0]}  # (B, T, d) -> (B, T, d)
    cross = _cross_token(full["J"], h)
    seq, pos = tokens.unbind(1)
    rounds = _rounds(seq) if cross else [torch.arange(len(tokens))]

    def at_tokens(product):
        def matvec(v: torch.Tensor) -> torch.Tensor:  # (K, d)
            res = torch.empty_like(v)
            for sel in rounds:  # tangents at several tokens of one sequence only when f is token-local
                V = torch.zeros_like(h)
                V[seq[sel], pos[sel]] = v[sel].to(h.dtype)
                res[sel] = product(V)[seq[sel], pos[sel]].to(v.dtype)
            return res
        return matvec

    return at_tokens(full["J"]), at_tokens(full["Jt"]), cross


def _cross_token(J: Callable, h: torch.Tensor) -> bool:
    """Does any position other than t depend on h_r[t]? A tangent at position 0 only; causal or
    not, a dependence shows up at some later position (exact zeros otherwise)."""
    if h.size(1) == 1:
        return False
    V = torch.zeros_like(h)
    V[:, 0] = 1.0
    return bool(J(V)[:, 1:].abs().amax() > 0)


def _rounds(seq: torch.Tensor) -> list[torch.Tensor]:
    """Token indices in groups with at most one token per sequence: the k-th sampled token of
    every sequence goes to group k."""
    rank = torch.zeros_like(seq)
    for s in seq.unique():
        members = (seq == s).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    return [(rank == k).nonzero().flatten() for k in range(int(rank.max()) + 1)]


def _top_ritz(matvec: Callable, v0: torch.Tensor, n_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    """Largest |eigenvalue| of K independent d x d operators (`matvec`: (K, d) -> (K, d)) by
    Arnoldi from start vectors v0 (K, d): up to n_iter products, the Krylov basis kept orthonormal
    in fp64 (Gram-Schmidt twice), the estimate read from the eigenvalues of the projected
    Hessenberg matrix. Stops early when no token's estimate moved by more than `tol` (relative)."""
    K, d = v0.shape
    m = min(n_iter, d)
    Q = v0.new_zeros(K, m + 1, d)  # orthonormal Krylov basis, fp64
    H = v0.new_zeros(K, m + 1, m)  # Q^T A Q, upper Hessenberg
    Q[:, 0] = v0 / v0.norm(dim=-1, keepdim=True)
    est = prev = None
    for j in range(m):
        w = matvec(Q[:, j]).to(v0.dtype)  # (K, d)
        for _ in range(2):
            c = torch.einsum("kid,kd->ki", Q[:, : j + 1], w)
            H[:, : j + 1, j] += c
            w = w - torch.einsum("kid,ki->kd", Q[:, : j + 1], c)
        beta = w.norm(dim=-1)
        H[:, j + 1, j] = beta
        scale = H[:, : j + 1, : j + 1].abs().amax(dim=(1, 2)).clamp_min(1e-300)
        alive = beta > 1e-12 * scale  # else the Krylov space is invariant: its Ritz values are exact
        Q[:, j + 1] = torch.where(alive[:, None], w / beta.clamp_min(1e-300)[:, None], torch.zeros_like(w))
        est = torch.linalg.eigvals(H[:, : j + 1, : j + 1]).abs().amax(dim=-1)
        if prev is not None and ((est - prev).abs() <= tol * est.clamp_min(1e-12)).all():
            return est, j + 1
        prev = est
    return est, m
