"""Strong property (section 8.4): with unshare_core, self_attn_core, no_hyper, no_lti and no_lie
at R=k, CART is a plain stack of P+k+1 unique MLA layers. We copy CART's weights into such a
stack built from the library's `Block` and compare in float64.
Run: pytest tests/test_model_equivalence.py
"""
import pytest
import torch

from cartlab.model import CARTConfig, build_model
from cartlab.model.layers import MLAKV, Block

STRIP = ("unshare_core", "self_attn_core", "no_hyper", "no_lti", "no_lie")


@pytest.mark.parametrize("k", [1, 3])
def test_stripped_cart_equals_unique_layer_stack(k):
    torch.manual_seed(0)
    cfg = CARTConfig.tiny(prelude_layers=2, n_loops=k, hooks=STRIP)
    cart = build_model(cfg).double().eval()
    layers = [*cart.prelude, *cart.core, cart.coda]
    assert len(layers) == cfg.prelude_layers + k + 1
    stack = torch.nn.ModuleList(Block(cfg, MLAKV(cfg, cfg.kv_latent_dim)) for _ in layers).double()
    for ref, layer in zip(stack, layers):
        ref.load_state_dict(layer.state_dict())  # same parameter names: strict load
    assert sum(p.numel() for p in stack.parameters()) + cart.wte.weight.numel() + cart.norm.weight.numel() \
        == cart.num_params()

    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    x = cart.wte(idx)
    rope = cart.rope(0, idx.size(1), idx.device)
    for block in stack:
        x = block(x, rope)
    expected = cart.lm_head(cart.norm(x))
    got, _ = cart(idx)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_equivalence_breaks_when_any_machinery_is_kept():
    """The property is not vacuous: keeping the LTI gate changes the function."""
    torch.manual_seed(0)
    stripped = build_model(CARTConfig.tiny(hooks=STRIP)).double()
    torch.manual_seed(0)
    gated = build_model(CARTConfig.tiny(hooks=tuple(h for h in STRIP if h != "no_lti"))).double()
    gated.load_state_dict(stripped.state_dict(), strict=False)
    idx = torch.randint(0, 64, (1, 8))
    assert not torch.allclose(stripped(idx)[0], gated(idx)[0])
