"""transformers' auto classes know cartlab's model type in any process that imported cartlab.

    import cartlab
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported")   # no trust_remote_code, no prompt
    tok = AutoTokenizer.from_pretrained("exported")

An exported folder (`cartlab export`) carries its modeling code for `trust_remote_code=True`, and
config.json's `auto_map` names it. With cartlab installed, the installed code is the one to run:
`register()` adds `model_type: cartlab` to `AutoConfig` and `CartlabForCausalLM` to
`AutoModelForCausalLM`, so transformers finds local code and neither runs the folder's copy nor
asks "Do you wish to run the custom code? [y/N]" (the prompt that hangs a headless job; AutoTokenizer
reads config.json first and would ask too).

`import cartlab` stays cheap: `install()` only puts a finder on `sys.meta_path` that calls
`register()` once transformers' auto classes are imported (or at once, if they already are), and
the model class is registered through `LazyModel`, which imports torch and the model code on first
use, so a process that loads only a tokenizer never pays for them.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

AUTO = "transformers.models.auto"
"""The transformers module whose import means the auto classes are about to be used."""


class LazyModel:
    """Stands in for `cartlab.export.hf.CartlabForCausalLM` in AutoModelForCausalLM's mapping:
    the two classmethods the auto class calls import the real class and hand over to it."""

    @classmethod
    def real(cls):
        from cartlab.export.hf import CartlabForCausalLM

        return CartlabForCausalLM

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls.real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls.real()._from_config(config, **kwargs)


def register() -> None:
    """Register the cartlab model type with AutoConfig and AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cartlab.export.config import CartlabConfig

    LazyModel.config_class = CartlabConfig
    LazyModel.__name__ = LazyModel.__qualname__ = "CartlabForCausalLM"
    AutoConfig.register(CartlabConfig.model_type, CartlabConfig, exist_ok=True)
    AutoModelForCausalLM.register(CartlabConfig, LazyModel, exist_ok=True)


def _register_quietly() -> None:
    try:
        register()
    except Exception as err:  # a transformers without these APIs must still import
        warnings.warn(f"cartlab: could not register the cartlab model type with transformers ({err}); "
                      f"load exported models with trust_remote_code=True", RuntimeWarning, stacklevel=2)


class _AfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' auto module is about to be imported, it wraps the
    real loader so that `register()` runs right after the module has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' auto classes are loaded, else once they are (cheap: no import)."""
    if AUTO in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _AfterAutoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoImport())
