"""Fixed-point mode of CART's loop (hook `fixed_point`, `cartlab.model.solvers`; issue 27
acceptance 2): on a tiny float64 model the implicit-differentiation gradient of a converged fixed
point equals the gradient of the unrolled iteration run to convergence; Anderson needs fewer
iterations than plain iteration on a contractive loop; the Hutchinson penalty estimates |J|_F^2;
cached decoding equals the uncached forward; the solver fields are refused without their hook.
Run: pytest tests/test_fixed_point.py
"""
import pytest
import torch

from cartlab.model import CARTConfig, ConfigError, KVCache, build_model
from cartlab.model.solvers import anderson, iterate, jacobian_estimate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

IDX = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def solver_model(**kw):
    torch.manual_seed(0)
    return build_model(CARTConfig.tiny(hooks=("fixed_point",), **kw)).double()


def gradients(**kw):
    model = solver_model(**kw)
    _, loss = model(IDX, IDX)
    loss.backward()
    assert model.solver_stats.converged.all()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), model


def test_implicit_gradient_equals_unrolled_gradient_at_convergence():
    kw = dict(solver_tol=1e-12, solver_max_iter=300, gate_init=0.5)
    unrolled, _ = gradients(solver="iteration", backward="unrolled", **kw)
    for solver in ("iteration", "anderson"):
        ift, model = gradients(solver=solver, backward="ift", **kw)
        assert ((ift - unrolled).norm() / unrolled.norm()).item() <= 1e-3, solver
    assert model.wte.weight.grad.abs().sum() > 0 and model.anchor.kv.down.weight.grad.abs().sum() > 0
    phantom, _ = gradients(solver="iteration", backward="phantom", phantom_steps=8, **kw)
    one_step, _ = gradients(solver="iteration", backward="phantom", phantom_steps=1, **kw)
    err = lambda g: ((g - unrolled).norm() / unrolled.norm()).item()  # noqa: E731
    assert err(phantom) < err(one_step)  # more phantom steps: closer to the exact gradient


def test_anderson_needs_fewer_iterations_than_plain_iteration():
    counts = {}
    for solver in ("iteration", "anderson"):
        model = solver_model(solver=solver, solver_tol=1e-6, solver_max_iter=400).eval()
        with torch.no_grad():
            model(IDX)
        assert model.solver_stats.converged.all(), solver
        counts[solver] = model.solver_stats.iterations.double().mean().item()
        torch.testing.assert_close(model.loops_per_token, model.solver_stats.iterations.view(2, 8))
        curve = model.solver_stats.curve
        assert curve[-1] < 1e-6 and curve[0] > 1e-3
    assert counts["anderson"] < 0.7 * counts["iteration"], counts


def test_solvers_on_a_linear_contraction():
    """x = A x + b with |A| < 1: both solvers find (I - A)^-1 b; Anderson in fewer steps."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-0.5, 0.95, 16, dtype=torch.float64)) @ Q.T  # radius 0.95
    b = torch.randn(3, 16, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - A, b.T).T
    f = lambda x: x @ A.T + b  # noqa: E731
    (x1, s1), (x2, s2) = iterate(f, torch.zeros_like(b), 1e-10, 2000), anderson(f, torch.zeros_like(b), 1e-10, 2000)
    torch.testing.assert_close(x1, exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(x2, exact, rtol=0, atol=1e-7)
    assert s2.iterations.max() < s1.iterations.min()


def test_hutchinson_penalty_estimates_the_jacobian_norm():
    torch.manual_seed(0)
    W = torch.randn(8, 8, dtype=torch.float64)
    f = lambda x: torch.tanh(x @ W.T)  # noqa: E731
    z = torch.randn(4, 8, dtype=torch.float64)
    exact = sum(torch.autograd.functional.jacobian(f, z[i:i + 1]).pow(2).sum() for i in range(4)) / 4 / 8
    estimate = torch.stack([jacobian_estimate(f, z) for _ in range(2000)]).mean()
    assert estimate.item() == pytest.approx(exact.item(), rel=0.05)


def test_jacobian_penalty_enters_the_training_loss():
    plain = solver_model(solver_tol=1e-8, solver_max_iter=100).train()
    penalised = solver_model(solver_tol=1e-8, solver_max_iter=100, jacobian_penalty=0.5).train()
    _, a = plain(IDX, IDX)
    _, b = penalised(IDX, IDX)
    assert b > a and plain.aux_loss is None and penalised.aux_loss > 0
    b.backward()
    assert penalised.gate.logit.grad.abs().sum() > 0
    penalised.eval()
    with torch.no_grad():
        _, c = penalised(IDX, IDX)
    assert c.item() == pytest.approx(a.item(), rel=1e-9)  # evaluation: no penalty


def test_cached_decoding_equals_uncached_forward():
    model = solver_model(solver_tol=1e-9, solver_max_iter=200).eval()
    cache = KVCache()
    with torch.no_grad():
        full, _ = model(IDX)
        parts = [model(IDX[:, :5], cache=cache)[0]] + [model(IDX[:, j: j + 1], cache=cache)[0] for j in range(5, 8)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5
    assert cache.states["loops"].shape == (2, 8)


@pytest.mark.parametrize("kw, match", [
    (dict(solver_tol=1e-4), r"solver_tol=0.0001 .*add the hook fixed_point"),
    (dict(solver="anderson"), r"solver='anderson' .*the hook fixed_point: add it"),
    (dict(hooks=("fixed_point", "unfreeze_kv")), r"'fixed_point' and 'unfreeze_kv' cannot be combined: .*unfreeze_kv "
                                                 r"sets core_attention='recomputed': the fixed-point mode needs "
                                                 r"core_attention='anchor'"),
    (dict(hooks=("fixed_point", "unshare_core")), r"'fixed_point' and 'unshare_core' cannot .*needs share_core=true"),
    (dict(hooks=("fixed_point", "random_loops")), r"'fixed_point' and 'random_loops' cannot .*train_loops='fixed'"),
    (dict(hooks=("fixed_point",), core_attention="self"), r"core_attention='self' .*the hook fixed_point needs "
                                                         r"core_attention='anchor'"),
    (dict(hooks=("fixed_point",), phantom_steps=4), r"phantom_steps=4 .*backward='phantom' only"),
    (dict(hooks=("fixed_point",), backward="adjoint"), r"backward='adjoint'"),
    (dict(hooks=("fixed_point",), solver_max_iter=0), r"solver_max_iter=0"),
])
def test_bad_solver_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        CARTConfig.tiny(**kw)


def test_default_config_identity_is_unchanged():
    assert not {"solver", "solver_tol", "backward", "jacobian_penalty"} & set(CARTConfig.tiny().to_dict())
    assert CARTConfig.tiny(hooks=("fixed_point",)).to_dict()["solver"] == "anderson"


def test_a_fixed_point_run_trains_and_stores_the_solve_at_every_eval(tiny_data, tmp_path):
    from cartlab import results
    from cartlab.measures import known
    from cartlab.train.loop import train
    from train_helpers import TINY_MODEL, tiny_config

    assert known()["solver"].applies(CARTConfig.tiny(hooks=("fixed_point",)))
    assert not known()["solver"].applies(CARTConfig.tiny())
    for per_loop in ("depth_profile", "logit_lens", "loop_contraction"):  # no R loops to look inside
        assert not known()[per_loop].applies(CARTConfig.tiny(hooks=("fixed_point",))), per_loop
        assert known()[per_loop].applies(CARTConfig.tiny()), per_loop
    model = {**TINY_MODEL, "hooks": ["fixed_point"], "solver_max_iter": 12, "jacobian_penalty": 0.1}
    cfg = tiny_config(tiny_data, tmp_path, model=model, steps=4, eval_every=4, measures=None)  # what applies
    train(cfg)
    probes = results.probes(tmp_path / "results.db")
    summary = probes[(probes.probe == "solver") & (probes.x == 0)]
    assert set(summary.metric) == {"residual", "iterations", "converged"}
    assert set(summary.step) == {4} and len(summary) == 3 * probes.split.nunique()
    iters = summary[summary.metric == "iterations"].value
    assert ((iters >= 1) & (iters <= 12)).all()
    curve = probes[(probes.probe == "solver") & (probes.metric == "residual_curve")]
    assert 1 <= curve.x.max() <= 12


@pytest.mark.parametrize("backward", ["ift", "phantom"])
def test_training_under_bf16_autocast(backward):
    """The Anderson step's small solve runs in fp32 (linalg has no bf16 solve) under autocast."""
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(hooks=("fixed_point",), solver_max_iter=20, backward=backward)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(IDX, IDX)
    loss.backward()
    assert torch.isfinite(loss) and model.solver_stats.converged.float().mean() > 0.5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
