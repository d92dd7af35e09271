"""SAM (METHODS.md §3, §9 item 7): davda54/sam ``first_step`` / ``second_step`` and Saddle-LongTail's loop.

Checks the perturbation ``e = rho · g / (||g|| + 1e-12)`` with one global norm, the exact restore of ``w`` before the
base step (whose gradient is the one taken at ``w + e``), weight decay outside the perturbation, the rho schedule
through ``param_groups``, and BatchNorm running statistics over the two passes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.optim import SAM
from pipeline.train.method import StepOutput
from pipeline.train.updaters import UPDATERS, SAMUpdate, StandardUpdate

RHO, LR = 0.3, 0.1


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64)),
        nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)),
    ]


def _set_grads(params: list[nn.Parameter], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    return grads


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def test_first_step_perturbation_norm_is_rho() -> None:
    params = _params()
    w0 = [p.detach().clone() for p in params]
    # two param groups: the norm is still one global norm over both
    opt = SAM([{"params": [params[0]]}, {"params": [params[1]]}], torch.optim.SGD, rho=RHO, lr=LR)
    grads = _set_grads(params, seed=1)
    opt.first_step(zero_grad=True)
    e = [p.detach() - w for p, w in zip(params, w0, strict=True)]
    g = _global_norm(grads)
    torch.testing.assert_close(_global_norm(e), RHO * g / (g + 1e-12), rtol=1e-12, atol=0)
    for ei, gi in zip(e, grads, strict=True):  # e is parallel to g: rho * g / ||g||
        torch.testing.assert_close(ei, RHO * gi / (g + 1e-12), rtol=1e-12, atol=1e-15)
    assert all(p.grad is None for p in params)  # zero_grad=True (set_to_none)
    assert all(torch.equal(opt.state[p]["old_p"], w) for p, w in zip(params, w0, strict=True))


def test_adaptive_first_step_scales_by_p_squared() -> None:
    params = _params()
    w0 = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=2.0, adaptive=True, lr=LR)
    grads = _set_grads(params, seed=1)
    opt.first_step()
    norm = _global_norm([w.abs() * g for w, g in zip(w0, grads, strict=True)])
    for p, w, g in zip(params, w0, grads, strict=True):
        torch.testing.assert_close(p.detach() - w, 2.0 * w**2 * g / (norm + 1e-12), rtol=1e-10, atol=1e-14)


def test_second_step_restores_w_and_steps_with_the_perturbed_gradient() -> None:
    params = _params()
    w0 = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    _set_grads(params, seed=1)
    opt.first_step(zero_grad=True)
    g_pert = _set_grads(params, seed=2)  # "the gradient at w + e"

    seen: list[list[torch.Tensor]] = []
    base_step = opt.base_optimizer.step

    def spy(*args, **kwargs):
        seen.append([p.detach().clone() for p in params])
        return base_step(*args, **kwargs)

    opt.base_optimizer.step = spy
    opt.second_step(zero_grad=True)
    assert len(seen) == 1
    for before, w in zip(seen[0], w0, strict=True):  # restored exactly, before the base step
        assert torch.equal(before, w)
    for p, w, g in zip(params, w0, g_pert, strict=True):  # plain SGD step from w with the perturbed gradient
        assert torch.equal(p.detach(), w.clone().add_(g, alpha=-LR))
    assert all(p.grad is None for p in params)


def test_weight_decay_is_not_part_of_the_perturbation() -> None:
    wd = 0.5
    params = _params()
    w0 = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, weight_decay=wd)
    grads = _set_grads(params, seed=1)
    opt.first_step(zero_grad=True)
    g = _global_norm(grads)
    for p, w, gi in zip(params, w0, grads, strict=True):  # e from the loss gradient only
        torch.testing.assert_close(p.detach() - w, RHO * gi / (g + 1e-12), rtol=1e-12, atol=1e-15)
    g_pert = _set_grads(params, seed=2)
    opt.second_step()
    for p, w, gi in zip(params, w0, g_pert, strict=True):  # decay applied once, by SGD, at w
        torch.testing.assert_close(p.detach(), w - LR * (gi + wd * w), rtol=1e-12, atol=1e-15)


def test_lr_and_rho_set_on_sam_are_seen_by_the_base_optimizer() -> None:
    params = _params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    assert opt.param_groups is opt.base_optimizer.param_groups
    opt.param_groups[0]["lr"] = 0.01
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.01
    with pytest.raises(RuntimeError, match="first_step and second_step"):
        opt.step()
    with pytest.raises(ValueError, match="rho must be >= 0"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=LR)


def test_state_dict_round_trip_keeps_groups_shared() -> None:
    params = _params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    _set_grads(params, 1)
    opt.first_step(zero_grad=True)
    _set_grads(params, 2)
    opt.second_step()
    state = opt.state_dict()
    opt2 = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    opt2.load_state_dict(state)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == RHO
    buf = opt.base_optimizer.state[params[0]]["momentum_buffer"]
    assert torch.equal(opt2.base_optimizer.state[params[0]]["momentum_buffer"], buf)


# --- SAMUpdate --------------------------------------------------------------------------------------------------
def _linear_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


def test_sam_update_calls_compute_loss_twice_and_returns_the_second() -> None:
    model, x, y = _linear_problem()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    upd = UPDATERS.create("sam", rho_schedule=lambda e: RHO)
    upd.on_epoch_start(0, opt)
    outs: list[StepOutput] = []

    def compute() -> StepOutput:
        loss = nn.functional.cross_entropy(model(x), y)
        outs.append(StepOutput(loss=loss, parts={"ce": loss.detach()}))
        return outs[-1]

    out = upd.update(model, compute, opt)
    assert len(outs) == 2 and out is outs[1]

    # reference: gradient at w, e = rho g/||g||, gradient at w + e, SGD step from w
    ref = nn.Linear(4, 3).double()
    ref.load_state_dict(w0)
    loss1 = nn.functional.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss1, list(ref.parameters()))
    g = _global_norm(list(grads))
    with torch.no_grad():
        for p, gr in zip(ref.parameters(), grads, strict=True):
            p.add_(RHO * gr / (g + 1e-12))
    loss2 = nn.functional.cross_entropy(ref(x), y)
    grads2 = torch.autograd.grad(loss2, list(ref.parameters()))
    torch.testing.assert_close(out.loss.detach(), loss2.detach())  # the loss reported is the perturbed one
    for (name, p), gr in zip(model.named_parameters(), grads2, strict=True):
        torch.testing.assert_close(p.detach(), w0[name] - LR * gr, rtol=1e-12, atol=1e-14)


def test_sam_update_needs_a_sam_optimizer() -> None:
    model, x, y = _linear_problem()
    with pytest.raises(TypeError, match="SAM optimizer"):
        SAMUpdate(lambda e: RHO).update(
            model, lambda: StepOutput(loss=model(x).sum()), torch.optim.SGD(model.parameters(), lr=LR)
        )


def test_rho_schedule_sets_group_rho_on_epoch_start() -> None:
    model, _, _ = _linear_problem()
    opt = SAM([{"params": [model.weight]}, {"params": [model.bias]}], torch.optim.SGD, rho=0.05, lr=LR)
    upd = SAMUpdate(lambda e: 0.1 * (e + 1))
    upd.on_epoch_start(3, opt)
    assert [grp["rho"] for grp in opt.param_groups] == [pytest.approx(0.4)] * 2
    # the next first_step uses the new rho
    w0 = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.first_step()
    e = [p.detach() - w for p, w in zip(model.parameters(), w0, strict=True)]
    torch.testing.assert_close(_global_norm(e), torch.tensor(0.4, dtype=torch.float64))


def test_standard_update_is_one_pass() -> None:
    model, x, y = _linear_problem()
    calls = []

    def compute() -> StepOutput:
        calls.append(1)
        return StepOutput(loss=nn.functional.cross_entropy(model(x), y))

    upd = UPDATERS.create("standard")
    upd.on_epoch_start(0, torch.optim.SGD(model.parameters(), lr=LR))
    upd.update(model, compute, torch.optim.SGD(model.parameters(), lr=LR))
    assert len(calls) == 1 and isinstance(upd, StandardUpdate)


# --- BatchNorm over the two passes -------------------------------------------------------------------------------
def _bn_first() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """BN is the first layer, so both passes normalise the same input: the batch statistics m, v are shared."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64) * 2 + 1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return model, x, y


@pytest.mark.parametrize("freeze", [False, True])
def test_bn_running_stats_over_the_two_passes(freeze: bool) -> None:
    model, x, y = _bn_first()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    upd = SAMUpdate(lambda e: RHO, freeze_bn_second_pass=freeze)
    upd.on_epoch_start(0, opt)
    upd.update(model, lambda: StepOutput(loss=nn.functional.cross_entropy(model(x), y)), opt)
    bn = model[0]
    m, v = x.mean(0), x.var(0, unbiased=True)
    if freeze:  # one update with momentum 0.1 from (0, 1)
        exp_mean, exp_var = 0.1 * m, 0.9 + 0.1 * v
    else:  # official: two updates, 0.9·(0.9·r0 + 0.1·m) + 0.1·m
        exp_mean, exp_var = 0.19 * m, 0.81 + 0.19 * v
    torch.testing.assert_close(bn.running_mean, exp_mean)
    torch.testing.assert_close(bn.running_var, exp_var)
    assert bn.momentum == 0.1  # restored after the frozen pass
