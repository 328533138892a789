"""Analysis of CART/Dense results, one module per concept, each with its own figures, all on the
long-form frames of `schema`:

    runs            what a run trained: its config, model accounting and FLOPs (the one FLOPs source)
    scaling         power-law fits y = a x^b (section 7.3)
    joint_law       saturating laws: E + A x^-alpha, Chinchilla's L(N, D), the recurrence exponent
    scaling_study   the joint law on a study's runs: points, families, fits, tables, figures
    stats           seed noise: bands, seed means, curves over training
    screen          screen-vs-full-training agreement (section 9.5)
    decompose       the CART-Dense gap by component (section 8)
    spectral        the LTI gate's spectral radius (section 6)
    loops           inside the loop: logit lens and contraction (issue 15)
    depth           the test-time depth profile (section 7.4)
    adaptive        exit rules and fixed points: the compute-quality frontier, loop convergence (issue 27)
    compute         loss against training FLOPs, LRT's probe
    lrt_eval        LRT the authors' way: per-pass, merged and sequential BPB, the gap over S and sweeps
    plots           every figure function under one name (re-exported from the modules above)

    from cartlab.analysis import published, scaling
    res = published.load_published()
    fit = scaling.fit_power_law([256, 512, 768, 1024], [41.17, 27.10, 22.85, 20.35])

Importing this package is cheap (no torch, no matplotlib): submodules load on first use.
"""
import importlib

_SUBMODULES = (
    "schema", "published", "runs", "scaling", "joint_law", "scaling_study", "laws", "stats", "screen", "decompose",
    "spectral", "loops", "accounting", "figures", "plots", "synthetic", "depth", "adaptive", "compute", "lrt_eval",
    "findings",
)
__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
