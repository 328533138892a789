"""Model families: one `ModelSpec` per family says everything the rest of cartlab asks of it.

A family is a config class, a model class, its hooks (`cartlab.model.hooks`, registered with
`family=spec.name`) and the answers training, measures, evaluation, export and the results
database need: does it loop, does it carry a recurrent memory, how is a run of it named and
labelled. Each family registers its spec in its own module (`cart.py`, `dense.py`, `lrt.py`);
nothing outside those modules branches on a family's name.

    from cartlab.model.family import ModelSpec, register_family

    register_family(ModelSpec(name="toy", display="Toy", config=ToyConfig, model=Toy,
                              stem=lambda m: f"toy-d{m.d_model}", label=lambda m: f"toy d={m.d_model}"))

Two families may share a serialized `kind` (LRT is stored as kind "dense", so every config,
run id and variant key written before LRT became a family reads the same): `LMConfig.from_dict`
then picks the family whose own hooks the dict names (`config_for`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cartlab.config import ConfigError
from cartlab.model.hooks import hooks_for


@dataclass(frozen=True)
class ModelSpec:
    """One model family: what it is built from and what the rest of cartlab asks of it."""

    name: str
    """Family name, the `family=` of its hooks: 'cart', 'dense', 'lrt'."""
    display: str
    """How reports write it: 'CART', 'Dense', 'LRT'."""
    config: type
    """Its config class (an `LMConfig` subclass; `config.kind` is what `to_dict` stores)."""
    model: type
    """Its model class (a `CausalLM` subclass), built as `model(cfg)`."""
    stem: Callable[[Any], str]
    """config -> the run-name stem, e.g. 'cart-d128-P2-R4' or 'dense4L-d128'."""
    label: Callable[[Any], str]
    """config -> the variant label, e.g. 'cart d=128 P=2 R=4' or 'dense d=128 L=4'."""
    loops: bool = False
    """True when the model has a loop count n_loops that inference may change (depth and loop
    measures, `eval --n-loops`)."""
    memory: bool = False
    """True when the model carries a recurrent memory trained with interleaved position subsets
    (`memory_subsets`; the LRT measures)."""

    def hooks(self) -> list[str]:
        """The names of this family's hooks, in registration order."""
        return hooks_for(self.name)

    def build(self, cfg):
        """The model `cfg` describes."""
        return self.model(cfg)


FAMILIES: dict[str, ModelSpec] = {}
"""Every registered family by name, in registration order."""


def register_family(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to `FAMILIES`; its config class then answers to `family_of` and its kind to
    `LMConfig.from_dict`."""
    if spec.name in FAMILIES:
        raise ValueError(f"model family {spec.name!r} is already registered")
    if getattr(spec.config, "family", None) != spec.name:
        raise ValueError(f"model family {spec.name!r}: {spec.config.__name__}.family is "
                         f"{getattr(spec.config, 'family', None)!r}; it must be {spec.name!r}")
    FAMILIES[spec.name] = spec
    return spec


def family_of(cfg) -> ModelSpec:
    """The spec of the family whose config class `cfg` is."""
    for spec in FAMILIES.values():
        if type(cfg) is spec.config:
            return spec
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered model family; "
                     f"families: {', '.join(FAMILIES)}")


def build_model(cfg):
    """The model a config describes (CART for CARTConfig, Dense for DenseConfig, LRT for LRTConfig)."""
    return family_of(cfg).build(cfg)


def looping(attr: str = "display") -> str:
    """The families whose models loop, by `attr`: 'CART' (for messages that refuse a loop count)."""
    return ", ".join(getattr(s, attr) for s in FAMILIES.values() if s.loops)


def kinds() -> list[str]:
    """Every serialized `kind` a config dict may name, sorted."""
    return sorted({spec.config.kind for spec in FAMILIES.values()})


def config_for(d: Mapping) -> type:
    """The config class of the dict `d`: among the families whose config serializes to
    d["kind"], the one whose own hooks `d["hooks"]` names, else the one named like the kind."""
    kind = d.get("kind")
    candidates = [s for s in FAMILIES.values() if s.config.kind == kind] if isinstance(kind, str) else []
    if not candidates:
        raise ConfigError.value("kind", kind, f"choose one of {', '.join(kinds())}")
    named = d.get("hooks") or ()
    named = named.split(",") if isinstance(named, str) else list(named)
    for spec in candidates:
        if any(h in named for h in spec.hooks()):
            return spec.config
    base = [s for s in candidates if s.name == kind]
    return (base or candidates)[0].config
