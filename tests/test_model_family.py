"""Model families (`cartlab.model.family`): a family registered from this file alone builds, takes
its hook and round-trips its config through `LMConfig.from_dict`; the specs of CART, Dense and
LRT answer what the rest of cartlab asks of them with the strings stored runs already carry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from cartlab.config import ConfigError, field
from cartlab.model import (FAMILIES, HOOKS, LRT, LRT_HOOKS, PAPER_ABLATIONS, CART, CARTConfig, Dense, DenseConfig,
                           LMConfig, LRTConfig, ModelSpec, build_model, family_of, register_family, register_hook)
from cartlab.model.base import CausalLM
from cartlab.model.family import config_for, kinds
from cartlab.model.layers import SwiGLU


@dataclass
class ToyConfig(LMConfig):
    """A one-block MLP language model: enough to be a family of its own."""

    n_blocks: int = field(1, ge=1)
    hooks: tuple[str, ...] = field((), elide_default=True)

    kind: ClassVar[str] = "toy"
    family: ClassVar[str] = "toy"

    def validate(self) -> None:
        super().validate()
        from cartlab.model.hooks import apply_hooks

        apply_hooks(self)

    @property
    def effective_depth(self) -> int:
        return self.n_blocks


class Toy(CausalLM):
    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(SwiGLU(cfg) for _ in range(cfg.n_blocks))
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        x = self.wte(idx)  # (B, T, d): no attention, each position on its own
        for block in self.blocks:
            x = x + block(x)
        return self.head(x, targets, cache)

    def applications(self) -> list[tuple[str, nn.Module, int]]:
        return [("embedding", self.wte, 1), ("blocks", self.blocks, 1), ("norm", self.norm, 1)]


def toy_deeper(cfg):
    """Two blocks instead of one."""
    return {"n_blocks": 2}


@pytest.fixture
def toy():
    """The toy family and its hook, registered for one test and taken out again."""
    register_hook("toy_deeper", section="test", family="toy", group="toy")(toy_deeper)
    spec = register_family(ModelSpec(name="toy", display="Toy", config=ToyConfig, model=Toy,
                                     stem=lambda m: f"toy{m.n_blocks}B-d{m.d_model}",
                                     label=lambda m: f"toy d={m.d_model} B={m.n_blocks}"))
    yield spec
    FAMILIES.pop("toy")
    HOOKS.pop("toy_deeper")


def tiny_toy(**kw) -> ToyConfig:
    return ToyConfig(vocab_size=64, d_model=32, n_heads=4, ffn_multiple_of=16, **kw)


def test_a_family_registered_from_a_test_file_builds_hooks_and_round_trips(toy):
    cfg = tiny_toy(hooks=("toy_deeper",))
    assert cfg.n_blocks == 2 and family_of(cfg) is toy and toy.hooks() == ["toy_deeper"]
    assert "toy" in kinds()
    again = LMConfig.from_dict(cfg.to_dict())
    assert type(again) is ToyConfig and again == cfg and again.to_dict()["kind"] == "toy"
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model) is Toy and len(model.blocks) == 2
    logits, loss = model(torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 5)))
    assert logits.shape == (2, 5, 64) and torch.isfinite(loss)
    build_model(again).load_state_dict(model.state_dict())  # strict: the same modules
    with pytest.raises(ConfigError, match=r"^hooks=\['no_lti'\] is not allowed: 'no_lti' is a hook of the cart family.*; "
                                          r"toy hooks: toy_deeper$"):
        tiny_toy(hooks=("no_lti",))
    with pytest.raises(ConfigError, match=r"^hooks=\['toy_deeper'\] is not allowed: 'toy_deeper' is a hook of the toy family"):
        CARTConfig.tiny(hooks=("toy_deeper",))


def test_a_family_is_registered_once_and_its_config_must_name_it(toy):
    with pytest.raises(ValueError, match="model family 'toy' is already registered"):
        register_family(toy)
    with pytest.raises(ValueError, match=r"model family 'other': ToyConfig.family is 'toy'; it must be 'other'"):
        register_family(ModelSpec(name="other", display="Other", config=ToyConfig, model=Toy,
                                  stem=str, label=str))


def test_an_unknown_kind_is_one_line_naming_the_kinds():
    assert {"cart", "dense"} <= set(kinds())  # (and any kind another test file registered)
    with pytest.raises(ConfigError, match=rf"^kind='mamba' is not allowed: choose one of {', '.join(kinds())}$"):
        LMConfig.from_dict({"kind": "mamba"})
    with pytest.raises(ValueError, match="ToyConfig is not the config of a registered model family"):
        family_of(tiny_toy())


def test_the_specs_of_cart_dense_and_lrt():
    cart = CARTConfig(vocab_size=64, d_model=128, n_heads=4, prelude_layers=2, n_loops=4)
    dense = DenseConfig(vocab_size=64, d_model=128, n_heads=4, n_layers=4)
    lrt = LRTConfig(vocab_size=64, d_model=128, n_heads=4, n_layers=4, hooks=("lrt_kv",))
    specs = {name: family_of(cfg) for name, cfg in (("cart", cart), ("dense", dense), ("lrt", lrt))}
    assert {n: s.name for n, s in specs.items()} == {"cart": "cart", "dense": "dense", "lrt": "lrt"}
    assert [s.display for s in specs.values()] == ["CART", "Dense", "LRT"]
    assert [s.model for s in specs.values()] == [CART, Dense, LRT]
    assert [(s.loops, s.memory) for s in specs.values()] == [(True, False), (False, False), (False, True)]
    assert specs["cart"].stem(cart) == "cart-d128-P2-R4" and specs["cart"].label(cart) == "cart d=128 P=2 R=4"
    assert specs["dense"].stem(dense) == "dense4L-d128" and specs["dense"].label(dense) == "dense d=128 L=4"
    assert specs["lrt"].stem(lrt) == "dense4L-d128" and specs["lrt"].label(lrt) == "dense d=128 L=4"
    assert tuple(specs["cart"].hooks()[:7]) == PAPER_ABLATIONS and tuple(specs["lrt"].hooks()) == LRT_HOOKS + ("lrt_paper",)
    assert specs["dense"].hooks() == []
    assert PAPER_ABLATIONS == ("unfreeze_kv", "single_loop", "unshare_core", "self_attn_core", "no_hyper", "no_lti",
                               "no_lie")
    assert LRT_HOOKS == ("lrt_kv", "lrt_residual")
    # LRT is stored as kind dense: the dict's hooks pick the family
    assert lrt.to_dict()["kind"] == "dense" and config_for(lrt.to_dict()) is LRTConfig
    assert config_for(dense.to_dict()) is DenseConfig and config_for(cart.to_dict()) is CARTConfig
    assert config_for({"kind": "dense", "hooks": "lrt_residual"}) is LRTConfig  # a CLI override's comma list
    assert type(build_model(LRTConfig.tiny())) is LRT and type(build_model(DenseConfig.tiny())) is Dense


def test_the_results_schema_reads_the_registries():
    from cartlab.analysis import schema

    assert schema.MODELS == tuple(kinds()) and {"cart", "dense"} <= set(schema.MODELS)
    assert schema.PAPER_HOOKS == PAPER_ABLATIONS


def test_a_family_registered_here_trains_is_stored_and_reads_back_through_the_analysis(toy, tiny_data, tmp_path):
    """Acceptance 4 of issue 25: the toy family above, with nothing of cartlab changed, trains through
    `cartlab.train`, lands in the results database and reads back through `cartlab.analysis`."""
    from cartlab import results
    from cartlab.analysis import runs as analysis_runs
    from cartlab.analysis import schema
    from cartlab.train import train
    from train_helpers import tiny_config

    model = {"kind": "toy", "vocab_size": 512, "d_model": 32, "n_heads": 4, "ffn_multiple_of": 16,
             "hooks": ["toy_deeper"]}
    cfg = tiny_config(tiny_data, tmp_path, steps=4, eval_every=4, checkpoint_every=4, model=model)
    run_id = train(cfg)
    assert run_id.startswith("toy2B-d32-toy_deeper-s1-")
    frame = schema.validate(results.runs(cfg.results_db), "runs")  # the registry's kinds are the schema's
    row = frame.set_index("run_id").loc[run_id]
    assert (row.model, row.status, row.hooks, row.variant_label) == ("toy", "completed", "toy_deeper",
                                                                     "toy d=32 B=2 [toy_deeper]")
    built = build_model(LMConfig.from_dict(model))
    acc = analysis_runs.run_accounting(results.runs(cfg.results_db).set_index("run_id").loc[run_id].to_dict())
    assert acc.stored_params == built.num_params()
    ev = schema.validate(results.eval_log(cfg.results_db, [run_id]), "eval_log")
    assert set(ev.step) == {4} and ev.loss.notna().all()
    final = schema.final_eval(frame, ev)  # the frame every report table starts from
    assert set(final.model) == {"toy"} and (final.variant_label == "toy d=32 B=2 [toy_deeper]").all()
    assert len(final) == ev.split.nunique() >= 2
