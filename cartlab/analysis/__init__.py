"""Analysis of CART/Dense results: scaling fits, seed-noise statistics, gap decomposition,
spectral radius and compute accounting, all on the long-form frames of `schema`.

    from cartlab.analysis import published, scaling
    res = published.load_published()
    fit = scaling.fit_power_law([256, 512, 768, 1024], [41.17, 27.10, 22.85, 20.35])

Importing this package is cheap (no torch, no matplotlib): submodules load on first use.
"""
import importlib

_SUBMODULES = (
    "schema", "published", "scaling", "laws", "stats", "decompose", "spectral", "accounting", "plots", "synthetic",
    "depth", "compute",
)
__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
