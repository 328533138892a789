"""Config validation, serialisation and extension.

Guards: bad configs fail when made, with a message naming the field and the allowed values;
a config survives to_dict/from_dict (so a checkpoint rebuilds the same variant); a new hook and
component are added without editing the model files. Run: pytest tests/test_model_config.py
"""
import json

import pytest
import torch
import torch.nn as nn

from cartlab.model import HOOKS, CARTConfig, ConfigError, DenseConfig, LMConfig, build_model, register_hook
from cartlab.model.components import GATES, register


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=100, n_heads=3), r"n_heads=3 is not allowed: it does not divide d_model=100; n_heads must divide d_model .*: \[1, 2, 5, 10, 25, 50\]"),
    (dict(d_model=36, n_heads=4), r"n_heads=4 is not allowed: it gives heads of odd width 9; .*: \[1, 2, 3, 6, 9, 18\]"),
    (dict(init_std=0.0), r"init_std=0.0 is not allowed: must be > 0"),
    (dict(rope_theta=-1.0), r"rope_theta=-1.0 is not allowed: must be > 0"),
    (dict(prelude_layers=0), r"prelude_layers=0 is not allowed: must be >= 1"),
    (dict(n_loops=0), r"n_loops=0 is not allowed: must be >= 1"),
    (dict(vocab_size=1), r"vocab_size=1 is not allowed: must be >= 2"),
    (dict(hooks=("no_lti", "no_loop")), r"hooks=\['no_lti', 'no_loop'\] is not allowed: unknown hook\(s\) \['no_loop'\]; choose from .*no_lie"),
    (dict(hooks=("no_lti", "no_lti")), r"hooks=.* is not allowed: names a hook twice"),
    (dict(hooks=("unfreeze_kv", "self_attn_core")), r"'unfreeze_kv' and 'self_attn_core' cannot be combined"),
    (dict(state_gate="zoh"), r"state_gate='zoh' is not allowed: choose one of 'lti', 'residual'"),
    (dict(gate_init=1.0), r"gate_init=1.0 is not allowed: must be > 0 and < 1"),
])
def test_bad_cart_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CARTConfig.tiny(**kwargs)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        DenseConfig(n_layers=0)
    with pytest.raises(ConfigError, match=r"n_loop is not a field: did you mean 'n_loops'\?"):
        CARTConfig.from_dict({"kind": "cart", "n_loop": 3})
    with pytest.raises(ConfigError, match=r"kind='mamba' is not allowed: choose one of cart, dense"):
        LMConfig.from_dict({"kind": "mamba"})


def test_hook_order_is_canonical_and_roundtrip_rebuilds_variant():
    cfg = CARTConfig.tiny(hooks=("no_lti", "unshare_core"))
    assert cfg.hooks == ("unshare_core", "no_lti")
    assert cfg.share_core is False and cfg.state_gate == "residual"
    again = LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    torch.manual_seed(0)
    model = build_model(cfg)
    rebuilt = build_model(again)
    rebuilt.load_state_dict(model.state_dict())  # strict: same modules, same shapes
    idx = torch.randint(0, 64, (1, 7))
    torch.testing.assert_close(model(idx)[0], rebuilt(idx)[0])


def test_single_loop_overrides_R_and_paper_defaults():
    assert CARTConfig(hooks=("single_loop",)).n_loops == 1
    cfg = CARTConfig()
    assert (cfg.d_model, cfg.prelude_layers, cfg.n_loops, cfg.vocab_size) == (1024, 6, 6, 32000)
    assert (cfg.n_heads, cfg.kv_latent_dim, cfg.ffn_hidden) == (16, 256, 2816)


def test_every_hook_documents_its_paper_section():
    for hook in HOOKS.values():
        assert hook.section and hook.summary, hook.name
        assert hook.fn.__doc__


@pytest.fixture
def half_gate():
    """A new gate and hook registered from outside the model files, removed afterwards."""

    @register(GATES, "half")
    class HalfGate(nn.Module):
        def __init__(self, cfg):
            super().__init__()

        def forward(self, x, u):
            return 0.5 * x + u

        def spectral_radius(self):
            return {"max": 0.5, "mean": 0.5}

    @register_hook("half_gate", section="test")
    def half_gate(cfg):
        """Fixed retention of one half."""
        return {"state_gate": "half"}

    yield
    del GATES["half"], HOOKS["half_gate"]


def test_new_hook_needs_no_model_edit(half_gate):
    cfg = CARTConfig.tiny(hooks=("half_gate", "no_lie"))
    model = build_model(cfg)
    assert model.spectral_radius()["max"] == 0.5
    _, loss = model(torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 5)))
    loss.backward()
    with pytest.raises(ConfigError, match="'no_lti' and 'half_gate' cannot be combined: both set state_gate"):
        CARTConfig.tiny(hooks=("half_gate", "no_lti"))
