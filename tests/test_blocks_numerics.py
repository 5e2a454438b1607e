"""Numerical safety of every registered block (issue #24): finite outputs and gradients at the
magnitudes a feature map can take (1e4, 1e-4, exact zeros; float32 and bf16 autocast), float32
results that agree with the same block in float64 there, and double backward (a gradient
penalty: the gradient of a gradient) that runs and is right (``gradgradcheck``)."""
import copy
import functools

import pytest
import torch

import visattn

from .conftest import randomize_

C = 16
ALL = visattn.list_blocks()
SCALES = [1e4, 1e-4, 0.0]


def make(name, channels=C, **kw):
    return visattn.create_block(name, channels, **kw)


def _finite(tensors):
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"x{s:g}")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_finite_outputs_and_gradients_at_large_and_tiny_inputs(name, scale, train):
    block = randomize_(make(name)).train(train)
    x = (torch.randn(2, C, 6, 7) * scale).requires_grad_()
    y = block(x)
    assert torch.isfinite(y).all(), f"{name}: non-finite output for an input of scale {scale:g}"
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x, *params], allow_unused=True)
    assert _finite(grads), f"{name}: non-finite gradient for an input of scale {scale:g}"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [1e4, 1e-4], ids=lambda s: f"x{s:g}")
def test_float32_agrees_with_float64_at_large_and_tiny_inputs(name, scale):
    """Not just finite: the float32 answer is the float64 answer to float32 accuracy."""
    block = randomize_(make(name)).eval()
    block64 = copy.deepcopy(block).double()
    x = torch.randn(2, C, 6, 7) * scale
    with torch.no_grad():
        y, ref = block(x).double(), block64(x.double())
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-3, f"{name}: float32 is off by {err:.3g} (relative) at input scale {scale:g}"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [1e4, 1e-4], ids=lambda s: f"x{s:g}")
def test_finite_under_bf16_autocast_at_large_and_tiny_inputs(name, scale):
    block = randomize_(make(name), scale=0.2).eval()
    x = (torch.randn(2, C, 6, 7) * scale).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert torch.isfinite(y).all(), f"{name}: non-finite output under bf16 autocast at scale {scale:g}"
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert torch.isfinite(gx).all(), f"{name}: non-finite gradient under bf16 autocast at scale {scale:g}"


def test_entmax_is_finite_and_exact_for_large_scores():
    """alpha-entmax of huge scores is (nearly) one-hot; it equals the float64 result."""
    from visattn.layers import entmax_bisect

    x = torch.randn(4, 3, 50, dtype=torch.float64) * 1e8
    for alpha in (1.01, 1.5, 2.0):
        p = entmax_bisect(x.float(), alpha)
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.double(), entmax_bisect(x, alpha), atol=1e-5, rtol=0)
        torch.testing.assert_close(p.sum(-1), torch.ones(4, 3))


@pytest.mark.parametrize("name", ALL)
def test_double_backward_runs(name):
    """A gradient penalty in training: ``grad(out, x, create_graph=True)``, then the backward of
    its norm, reaches the input and every parameter (eval mode: see the gradgradcheck below)."""
    block = randomize_(make(name)).train()
    x = torch.randn(2, C, 6, 7, requires_grad=True)
    (gx,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    gx.norm().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    params = list(block.parameters())
    assert all(p.grad is not None for p in params) and _finite([p.grad for p in params])


@pytest.mark.parametrize("name", ALL)
def test_gradgradcheck_float64(name):
    """Second derivatives are right, in the input and the parameters together (numerical check in
    float64; the parameters as one flat vector, so the check costs a few evaluations per block)."""
    block = randomize_(make(name, 8)).double().eval()
    names = [k for k, _ in block.named_parameters()]
    shapes = [p.shape for _, p in block.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in block.parameters()] or [torch.zeros(0).double()])
    buffers = dict(block.named_buffers())
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, flat):
        ps = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return torch.func.functional_call(block, {**buffers, **ps}, (x,))

    inputs = (x, flat.requires_grad_()) if names else (x,)
    assert torch.autograd.gradgradcheck(fn if names else (lambda x: fn(x, flat)), inputs, fast_mode=True)


@pytest.mark.parametrize("name,train", [("se", False), ("cbam", True)])
def test_double_backward_through_the_fused_gpu_path(name, train, monkeypatch):
    """The compiled gate kernels (CUDA) refuse double backward in torch.compile; a gradient
    penalty through them equals the plain path's, and CBAM's BatchNorm counts the batch once.
    The GPU is stood in for by the CPU and Inductor by aot_eager (the same autograd wrapping)."""
    from visattn.layers import _fused, set_fused

    compiled = []

    def aot_eager(kind):
        compiled.append(kind)
        return torch.compile(_fused.PURE[kind], backend="aot_eager")

    monkeypatch.setattr(_fused, "_on_cuda", lambda x: True)
    monkeypatch.setattr(_fused, "_compile_usable", lambda device_type: True)
    monkeypatch.setattr(_fused, "_compiled", functools.cache(aot_eager))
    torch._dynamo.reset()
    results = []
    try:
        for fused in (True, False):
            set_fused(fused)
            torch.manual_seed(0)
            block = randomize_(make(name)).train(train)
            x = torch.randn(2, C, 6, 7, requires_grad=True)
            (gx,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
            gx.norm().backward()
            results.append((x.grad, {k: p.grad for k, p in block.named_parameters()}, block.state_dict()))
    finally:
        set_fused(None)
    assert compiled == [name]  # the fused path ran
    (gx_f, gp_f, state_f), (gx_p, gp_p, state_p) = results
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-4, atol=1e-5)
    for k in gp_p:
        torch.testing.assert_close(gp_f[k], gp_p[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in state_p:
        torch.testing.assert_close(state_f[k], state_p[k], msg=k)
