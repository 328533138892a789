"""CART, the Context-Anchored Recurrent Transformer (section 3), top to bottom:

    tokens -> embedding -> prelude (P MLA layers) -> e                       # section 3.1
    anchor: K, V = MLA-KV(norm(e)), computed once                            # section 3.1
    h_0 = e; for r in 0..R-1:                                                # section 3.2, `step`
        x_r = HyperConnection(h_r, h_{r-1}, h_{r-2})                         # step 1
        z_r = x_r + LIE(r)                                                   # step 2: loop-index embedding
        u_r = CoreBlock(z_r)                                                 # steps 3-4: cross-attention, SwiGLU
        h_{r+1} = A * x_r + u_r                                              # step 5: sigmoid LTI gate
    coda (1 MLA layer) -> norm -> tied LM head                               # section 3.3

Which parts fill those slots is read from the config in one place (`__init__`); the ablation
hooks of section 8 only change the config (see `cartlab.model.hooks`). Two ways out of the fixed
R loop (issue 27): a per-token exit rule at inference (`forward(..., exit="kl")`,
`cartlab.model.exits`), and the hook `fixed_point`, which solves h* = f(h*) instead of looping
(`cartlab.model.solvers`). Either way `loops_per_token` (B, T) holds the loops each token ran. Two hooks change training
only: `random_loops` (the training loop passes each step's R as `n_loops`) and `truncated_bptt`
(`recur` runs the first R - k loops without gradient). The parts of a loop step are in
`cartlab.model.components`, in the same order.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from cartlab.model.base import CausalLM
from cartlab.model.components import CORE_ATTENTION, GATES, LOOP_EMBEDDINGS, MIXERS, CoreBlock, LoopContext
from cartlab.model.config import CARTConfig
from cartlab.model.exits import ExitHead, ExitRule, Halting, exit_rule
from cartlab.model.family import ModelSpec, register_family
from cartlab.model.layers import MLAKV, Block, KVCache, cache_site
from cartlab.model.solvers import fixed_point

Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


class CART(CausalLM):
    def __init__(self, cfg: CARTConfig):
        # The parts are made in the order checkpoints store them and the seed initialises them
        # (kept as is); `forward` runs them in the paper's order.
        super().__init__(cfg)
        self.prelude = nn.ModuleList(Block(cfg, MLAKV(cfg, cfg.kv_latent_dim)) for _ in range(cfg.prelude_layers))
        self.anchor = CORE_ATTENTION[cfg.core_attention].source(cfg)
        self.core = nn.ModuleList(CoreBlock(cfg) for _ in range(cfg.n_core_blocks))
        self.mixer = MIXERS[cfg.state_mixer](cfg)
        self.loop_embedding = LOOP_EMBEDDINGS[cfg.loop_embedding](cfg)
        self.gate = GATES[cfg.state_gate](cfg)
        self.coda = Block(cfg, MLAKV(cfg, cfg.kv_latent_dim))
        self.exit_head = ExitHead(cfg) if cfg.exit_head else None  # hook exit_head: read by exit='learned'
        self.init_weights()
        self.loops_per_token: torch.Tensor | None = None  # (B, T) after a forward: loops each token ran
        self.solver_stats = None  # `solvers.Stats` of the last fixed-point forward
        self.aux_loss: torch.Tensor | None = None  # the last training forward's Jacobian penalty or exit-head loss

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None,
                cache: KVCache | None = None, exit: str | None = None, exit_threshold: float | None = None,
                attention_mask: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, V), loss. `n_loops` overrides R for this call (variable-R
        inference; with an exit rule, the most loops a token runs); `cache` makes this call
        continue a sequence (KV-cached generation); `exit`, `exit_threshold` pick a per-token
        exit rule (`cartlab.model.exits`); `attention_mask` (B, T), 1 for real tokens and 0 for
        left padding, hides padding from the prelude, the anchor cross-attention and the coda
        (`CausalLM.positions`). In training the loss includes `aux_loss` (the
        fixed-point Jacobian penalty, or the exit head's loss), both weighted."""
        e, rope = self.encode(idx, cache, attention_mask)  # (B, T, d)
        h = self.recur(e, rope, n_loops, cache, halt=exit_rule(exit, exit_threshold))  # (B, T, d)
        h = self.coda(h, rope, cache_site(cache, "coda"))
        if cache is not None:
            cache.pos += idx.size(1)
        logits, loss = self.head(h, targets, cache)
        if loss is not None and self.aux_loss is not None:
            loss = loss + self.aux_loss
        return logits, loss

    def encode(self, idx: torch.Tensor, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None):
        """Embedding and prelude: the anchor's source e (B, T, d) and the rotary angles."""
        rope = self.positions(idx, cache, attention_mask)
        x = self.wte(idx)
        for i, block in enumerate(self.prelude):
            x = block(x, rope, cache_site(cache, f"prelude.{i}"))
        return x, rope

    def recur(self, e: torch.Tensor, rope, n_loops: int | None = None, cache: KVCache | None = None,
              observe: Observer | None = None, halt: ExitRule | None = None) -> torch.Tensor:
        """The recurrent core: R loop steps from h_0 = e; returns h_R (B, T, d).

        Truncated BPTT (`bptt_loops` = k, in training with autograd on): the first R - k loops run
        without gradient, so the states they leave in the history enter the last k loops as
        constants. The loop's weights (core block, mixer, loop embedding, gate) then get gradient
        from the last k loops only; the prelude and the anchor still get it through the anchor's
        K, V (read by every graded loop) and through h_0 = e while e is still in the mixer's
        history. The forward's values do not change.

        An exit rule `halt` freezes each token's history once it stops (`exits.Halting`); the
        loop ends early when every token has stopped, unless a per-loop cache still needs rows."""
        self.aux_loss = None
        if self.config.solver != "none":
            return self.solve(e, rope, cache, halt)
        n_loops = self.check_loops(n_loops)
        anchor = self.anchor.begin(e, cache)  # K, V computed once (None when every loop projects its own)
        history = [e] * self.mixer.depth  # ring buffer h_r, h_{r-1}, ...
        frozen = self.frozen_loops(n_loops)
        halting = None if halt is None else Halting(halt, self, e)
        states = [] if self.exit_head is not None and self.training and torch.is_grad_enabled() else None
        for r in range(n_loops):
            with torch.no_grad() if r < frozen else contextlib.nullcontext():
                h = self.step(history, LoopContext(r, rope, cache, anchor))
            if observe is not None:
                observe(r, h, history[0])
            if states is not None:
                states.append(h)  # the exit head learns from every loop's state
            if halting is None:
                history = [h] + history[:-1]
                continue
            history = halting.advance(history, [h] + history[:-1])
            if (cache is None or self.anchor.loop_invariant) and halting.finished():
                break
        self.count_loops(e.new_full(e.shape[:-1], n_loops, dtype=torch.long) if halting is None else halting.loops,
                         cache)
        if states:
            self.aux_loss = self.config.exit_loss_weight * self.exit_head.loss(self, states)
        return history[0]

    def solve(self, e: torch.Tensor, rope, cache: KVCache | None, halt: ExitRule | None) -> torch.Tensor:
        """Fixed-point mode (hook `fixed_point`, `cartlab.model.solvers`): h* = f(h*) for the loop
        map f(h) = step([h, h, h], r = 0), solved per token from h_0 = e; returns f(h*) (B, T, d)."""
        if halt is not None:
            raise ValueError(f"exit={halt.name!r} is not allowed in fixed-point mode (hook fixed_point): the "
                             f"solver decides each token's iterations (solver_tol)")
        cfg = self.config
        anchor = self.anchor.begin(e, cache)
        loop = LoopContext(0, rope, cache, anchor)

        def f(x: torch.Tensor) -> torch.Tensor:  # (B * T, d) -> (B * T, d)
            h = x.view(e.shape)
            return self.step([h] * self.mixer.depth, loop).reshape(x.shape)

        penalise = cfg.jacobian_penalty > 0 and self.training
        res = fixed_point(f, e.reshape(-1, e.size(-1)), cfg.solver, cfg.solver_tol, cfg.solver_max_iter,
                          cfg.backward, cfg.phantom_steps, penalise)
        self.solver_stats = res.stats
        if res.penalty is not None:
            self.aux_loss = cfg.jacobian_penalty * res.penalty
        self.count_loops(res.stats.iterations.view(e.shape[:-1]), cache)
        return res.out.view(e.shape)

    def count_loops(self, loops: torch.Tensor, cache: KVCache | None) -> None:
        """Keep each token's loop count (B, T); a cache collects them over the whole sequence."""
        if cache is not None:
            old = cache.states.get("loops")
            loops = loops if old is None else torch.cat([old, loops], dim=1)
            cache.states["loops"] = loops
        self.loops_per_token = loops

    def step(self, history: list[torch.Tensor], loop: LoopContext) -> torch.Tensor:
        """One loop step (section 3.2): h_{r+1} (B, T, d) from the history [h_r, h_{r-1}, ...]
        (`mixer.depth` states, newest first). `cartlab.model.probes` differentiates this map."""
        x = self.mixer(history)  # 1. HyperConnection blend: (B, T, d)
        z = self.loop_embedding(x, loop.r)  # 2. + LIE(r): (B, T, d)
        loop = self.anchor.read(z, loop)  # 3. the anchor this loop reads (recomputed from z under unfreeze_kv)
        u = self.core[loop.r % len(self.core)](z, loop)  # 3-4. cross-attention to the anchor, SwiGLU: (B, T, d)
        return self.gate(x, u)  # 5. LTI gate

    def frozen_loops(self, n_loops: int) -> int:
        """How many leading loops truncated BPTT runs without gradient: R - k in training with
        autograd on (none when R <= k), else 0 (evaluation, probes, generation)."""
        k = self.config.bptt_loops
        if k is None or not (self.training and torch.is_grad_enabled()):
            return 0
        return max(0, n_loops - k)

    def check_loops(self, n_loops: int | None) -> int:
        n = self.config.n_loops if n_loops is None else n_loops
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_loops={n!r} is not allowed; it must be an integer >= 1")
        if not self.config.share_core and n > len(self.core):
            raise ValueError(
                f"n_loops={n} is not allowed for an unshared core with {len(self.core)} blocks; "
                f"allowed: 1..{len(self.core)}"
            )
        return n

    @torch.no_grad()
    def loop_trace(self, idx: torch.Tensor, n_loops: int | None = None) -> list[dict]:
        """One row per loop: mean per-token L2 norm of the state after the loop and its mean
        distance to the state before it (how far each iteration still moves the state)."""
        rows: list[dict] = []

        def observe(r: int, h: torch.Tensor, prev: torch.Tensor) -> None:
            rows.append({
                "loop": r + 1,
                "state_norm": h.float().norm(dim=-1).mean().item(),
                "delta_norm": (h.float() - prev.float()).norm(dim=-1).mean().item(),
            })

        e, rope = self.encode(idx)
        self.recur(e, rope, n_loops, observe=observe)
        return rows

    def spectral_radius(self) -> dict[str, float]:
        """Spectral radius of the gate's transition (section 6): max over channels, and mean."""
        return self.gate.spectral_radius()

    def diagnostics(self) -> dict:
        rho = self.spectral_radius()
        out = {"rho_max": rho["max"], "rho_mean": rho["mean"]}
        if hasattr(self.mixer, "weights"):
            out["hyper_weights"] = self.mixer.weights().tolist()
        return out

    def compile_loop(self, **compile_kw) -> None:
        """torch.compile the loop body in place: each core block, the bulk of a loop's compute.
        Compiling the whole forward specialises on the Python loop count (one graph per R); a
        core block's graph does not depend on R, so training with a random R per step compiles
        once per autograd mode (with and without gradient, for truncated BPTT). In training there
        is no KV cache, so no variant's core block reads the loop index; decoding with a cache,
        unfreeze_kv and self_attn_core name a cache site per loop and specialise on it: at most
        one graph per loop index, never one per R."""
        for block in self.core:
            block.compile(**compile_kw)

    def applications(self, n_loops: float | None = None) -> list[tuple[str, nn.Module, float]]:
        """Which part runs how often per forward at R = `n_loops` (default: the configured R).
        The accounting passes the expected R of random-loop training, which may be fractional;
        an unshared core's blocks then count by their average use (R / blocks each)."""
        R = self.config.n_loops if n_loops is None else n_loops
        return [
            ("embedding", self.wte, 1),
            ("prelude", self.prelude, 1),
            ("anchor", self.anchor, self.anchor.applications(R)),
            ("core", self.core, R / len(self.core)),
            ("mixer", self.mixer, R),
            ("loop_embedding", self.loop_embedding, R),
            ("gate", self.gate, R),
            ("coda", self.coda, 1),
            ("norm", self.norm, 1),
        ]

    def train_applications(self, n_loops: float | None = None) -> list[tuple[str, nn.Module, float]]:
        """A training forward runs what inference runs (truncated BPTT shortens the backward only)."""
        return self.applications(n_loops)


register_family(ModelSpec(
    name="cart", display="CART", config=CARTConfig, model=CART, loops=True,
    stem=lambda m: f"cart-d{m.d_model}-P{m.prelude_layers}-R{m.n_loops}",
    label=lambda m: f"cart d={m.d_model} P={m.prelude_layers} R={m.n_loops}"))
