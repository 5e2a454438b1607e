"""The banded depthwise convolution used by routing (LCE) and quadtree (LePE): same values and
gradients as PyTorch's own convolution, whatever the band size."""
import pytest
import torch
from torch import nn

from visattn.layers import _depthwise
from visattn.layers._depthwise import depthwise_conv


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("band_bytes", [1, 300, 1 << 20])  # one row per band, a few rows, one band
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_banded_depthwise_equals_conv2d(kernel, band_bytes, channels_last, bias, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(_depthwise, "BAND_BYTES", band_bytes)
    conv = nn.Conv2d(4, 4, kernel, padding=kernel // 2, groups=4, bias=bias).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    y = depthwise_conv(conv, x)
    assert y.grad_fn is not None and "Banded" in type(y.grad_fn).__name__
    got = torch.autograd.grad(y, [x, *conv.parameters()], g)
    y_ref = conv(x)
    want = torch.autograd.grad(y_ref, [x, *conv.parameters()], g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_banded_depthwise_gradcheck_and_frozen_input(monkeypatch):
    monkeypatch.setattr(_depthwise, "BAND_BYTES", 64)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: _depthwise._BandedDepthwise.apply(t, w, b, (1, 1)),
                                    (x, conv.weight, conv.bias))
    frozen = x.detach()  # only the weights need a gradient
    (gw,) = torch.autograd.grad(depthwise_conv(conv, frozen).sum(), [conv.weight])
    (want,) = torch.autograd.grad(conv(frozen).sum(), [conv.weight])
    torch.testing.assert_close(gw, want, rtol=1e-12, atol=1e-12)


def test_depthwise_conv_plain_paths_and_bad_conv():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():  # no autograd: PyTorch's own convolution
        assert torch.equal(depthwise_conv(conv, x), conv(x))
    for bad in (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4, stride=2),
                nn.Conv2d(4, 4, 3, padding="same", groups=4), nn.Conv2d(4, 4, 3, padding=2, groups=4),
                nn.Conv2d(4, 4, 2, padding=1, groups=4)):
        with pytest.raises(ValueError, match="depthwise, stride-1"):
            depthwise_conv(bad, x)


def test_banded_depthwise_twice_differentiable(monkeypatch):
    monkeypatch.setattr(_depthwise, "BAND_BYTES", 64)  # several bands
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t, w, b: _depthwise._BandedDepthwise.apply(t, w, b, (1, 1)),
                                        (x, conv.weight, conv.bias))


def test_hooks_subclasses_and_transforms_take_the_module_path():
    """Hooks (pruning, weight norm), Conv2d subclasses and torch.func transforms act through
    ``conv(x)``: the banded path would skip them, so it is not taken."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    calls = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    depthwise_conv(conv, x)
    assert calls == [1]

    pruned = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    for _ in range(2):  # the pruned weight is recomputed by its pre-hook every call
        y = depthwise_conv(pruned, x)
        torch.testing.assert_close(y, pruned(x))
        y.sum().backward()

    class Standardised(nn.Conv2d):
        def forward(self, t):
            return self._conv_forward(t, self.weight - self.weight.mean((1, 2, 3), keepdim=True), self.bias)

    sub = Standardised(4, 4, 3, padding=1, groups=4)
    torch.testing.assert_close(depthwise_conv(sub, x), sub(x))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, t):
            return depthwise_conv(self.conv, t)

    wrap = Wrap()
    got = torch.func.grad(lambda p: torch.func.functional_call(wrap, p, (x,)).square().sum())(
        dict(wrap.named_parameters()))
    want = torch.autograd.grad(wrap.conv(x).square().sum(), list(wrap.parameters()))
    for a, b in zip(got.values(), want, strict=True):
        torch.testing.assert_close(a, b)
