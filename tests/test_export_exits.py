"""Per-token exit rules through the exported transformers model (issue 27 acceptance 5): the
generated modeling file's wrapper takes `exit` / `exit_threshold` in a call, in `generate()` and
from its config (as `from_pretrained(DIR, exit=...)` or lm-eval's model args set them), gives
cartlab's logits and tokens with the same rule, and counts the mean loops per token (padding
left out).
Run: pytest tests/test_export_exits.py
"""
from __future__ import annotations

import pytest
import torch
from conftest import need

need("transformers")

from cartlab.export.write import MODELING, import_modeling, modeling_source  # noqa: E402
from cartlab.model import CARTConfig, DenseConfig, build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RULE = dict(exit="latent", exit_threshold=0.2)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("modeling") / MODELING
    path.write_text(modeling_source())
    return import_modeling(path)


def wrap(hf, cfg, **config_kw):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    wrapper = hf.CartlabForCausalLM(hf.CartlabConfig(cartlab=cfg.to_dict(), n_loops=cfg.n_loops, **config_kw)).eval()
    wrapper.model.load_state_dict(model.state_dict())
    return model, wrapper


def test_the_exported_model_exits_per_token_as_cartlab_does(hf):
    model, wrapper = wrap(hf, CARTConfig.tiny(n_loops=5, init_std=0.1))
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(x, **RULE)
        loops = model.loops_per_token
        theirs = wrapper(x, **RULE).logits
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert loops.min() < loops.max()  # the rule does stop some tokens early
    assert wrapper.mean_loops_per_token() == pytest.approx(loops.double().mean().item())
    assert torch.equal(wrapper.generate(x, max_new_tokens=5, do_sample=False, **RULE),
                       model.generate(x, 5, temperature=0, **RULE))
    wrapper.reset_loops()
    with torch.no_grad():
        wrapper(x)
    assert wrapper.mean_loops_per_token() == 5  # without a rule every token runs n_loops


def test_the_rule_can_come_from_the_config(hf):
    model, wrapper = wrap(hf, CARTConfig.tiny(n_loops=5, init_std=0.1), **RULE)
    x = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(wrapper(x).logits, model(x, **RULE)[0])
    assert wrapper.mean_loops_per_token() < 5


def test_an_exit_rule_on_a_model_without_loops_is_refused(hf):
    cfg = DenseConfig.tiny()
    wrapper = hf.CartlabForCausalLM(hf.CartlabConfig(cartlab=cfg.to_dict())).eval()
    with pytest.raises(ValueError, match=r"exit='kl' is not allowed: only CART models loop; this model is dense"):
        wrapper(torch.zeros(1, 3, dtype=torch.long), exit="kl")


def test_padding_is_not_counted_in_the_mean_loops_per_token(hf):
    _, wrapper = wrap(hf, CARTConfig.tiny(n_loops=5, init_std=0.1))
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # row 1 left-padded: 3 real tokens
    with torch.no_grad():
        wrapper(x, attention_mask=mask, **RULE)
    loops = wrapper.model.loops_per_token.double()  # (2, 8), padding included
    assert wrapper.mean_loops_per_token() == pytest.approx(loops[mask.bool()].mean().item())
    assert loops[mask.bool()].mean() != loops.mean()  # counting the padding would have changed the mean
