"""The block contract, for every registered block: (N, C, H, W) -> (N, C, H, W), same dtype and
device, any H, W >= 1 and N >= 1, channels_last, bf16 autocast, gradients, gradcheck, torch.func (vmap,
per-sample gradients), torch.compile, clear errors, and the chunked inference path equal to the
plain one."""
import pytest
import torch

import visattn
from visattn.layers import _base

from .conftest import randomize_

C = 16
ALL = visattn.list_blocks()


def make(name, channels=C, **kw):
    return visattn.create_block(name, channels, **kw)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(2, C, 7, 9), (1, C, 1, 1), (3, C, 1, 5), (1, C, 12, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_shape_dtype_device(name, shape, train):
    block = make(name).train(train)
    x = torch.randn(shape)
    y = block(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_module_dtype_is_kept(name, dtype):
    block = make(name).to(dtype).eval()
    y = block(torch.randn(2, C, 6, 5, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_depends_on_input(name):
    block = randomize_(make(name)).eval()
    x = torch.randn(2, C, 6, 5)
    assert not torch.allclose(block(x), block(x + torch.randn_like(x)))


@pytest.mark.parametrize("name", ALL)
def test_not_4d_is_an_error(name):
    block = make(name)
    for bad in (torch.randn(C, 8, 8), torch.randn(1, 2, C, 8, 8)):
        with pytest.raises(ValueError, match=r"4-D tensor of shape \(N, C, H, W\)"):
            block(bad)


@pytest.mark.parametrize("name", ALL)
def test_wrong_channel_count(name):
    block = make(name).eval()
    x = torch.randn(2, C + 8, 5, 5)
    if block.channels is None:  # no per-channel weights: any count is fine
        assert block(x).shape == x.shape
    else:
        with pytest.raises(ValueError, match=f"built for {C} input channels, got a tensor with {C + 8}"):
            block(x)


@pytest.mark.parametrize("name", ALL)
def test_empty_tensor_is_an_error(name):
    with pytest.raises(ValueError, match="empty tensor"):
        make(name)(torch.randn(0, C, 4, 4))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("train", [True, False])
def test_channels_last_same_result(name, train):
    block = randomize_(make(name)).train(train)
    x = torch.randn(3, C, 7, 9)
    ref = block(x)
    y = block(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast(name):
    block = randomize_(make(name), scale=0.2).eval()
    x = torch.randn(2, C, 8, 8)
    ref = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (y - ref).abs().mean() / ref.abs().mean()
    assert err < 0.05, f"relative error {err:.3f} under bf16 autocast"


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_and_input_get_gradients(name):
    block = make(name).train()
    with torch.no_grad():  # zero-initialised scales would hide everything behind them
        for p in block.parameters():
            if not p.any():
                p.fill_(0.5)
    x = torch.randn(2, C, 6, 7, requires_grad=True)
    block(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_float64(name, train):
    block = randomize_(make(name, 8)).double().train(train)
    params = dict(block.named_parameters())
    buffers = dict(block.named_buffers())
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        state = {**buffers, **dict(zip(params, ps))}
        return torch.func.functional_call(block, state, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), fast_mode=True)


@pytest.mark.parametrize("name", ALL)
def test_torch_func_vmap_and_per_sample_gradients(name):
    """vmap over a stack of batches equals running them one by one, and per-sample gradients
    (vmap of grad) add up to the batch gradient. Eval mode: a training BatchNorm updates its
    buffers in place, which torch.func refuses in any module."""
    block = randomize_(make(name)).double().eval()
    x = torch.randn(3, 2, C, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(block)(x), torch.stack([block(b) for b in x]))
    params = {k: p.detach() for k, p in block.named_parameters()}
    if not params:
        return
    buffers = dict(block.named_buffers())

    def loss(ps, sample):
        return torch.func.functional_call(block, {**buffers, **ps}, (sample[None],)).square().sum()

    samples = x.flatten(0, 1)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, samples)
    block(samples).square().sum().backward()
    for k, p in block.named_parameters():
        torch.testing.assert_close(per_sample[k].sum(0), p.grad, msg=k)


@pytest.mark.parametrize("name", ALL)
def test_torch_compile_graph_capture(name):
    torch._dynamo.reset()  # all blocks share AttentionBlock.forward: one cache entry per test
    block = randomize_(make(name)).eval()
    x = torch.randn(2, C, 7, 9)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.parametrize("name", ALL)
def test_chunked_inference_equals_plain(name, monkeypatch):
    block = randomize_(make(name)).eval()
    block.chunked_inference = True  # exercise the chunked path even where it is off by default
    x = torch.randn(5, C, 9, 8)
    ref = block(x)  # grad enabled: plain path
    monkeypatch.setattr(_base, "CHUNK_BYTES", 2 * x[0].numel() * x.element_size())
    with torch.no_grad():
        assert block._use_chunks(x)
        y = block(x)
        y_cl = block(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_cl, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_train_mode_under_no_grad_uses_batch_statistics(name, monkeypatch):
    """Training-mode BatchNorm needs the whole batch: no chunking even without autograd."""
    monkeypatch.setattr(_base, "CHUNK_BYTES", 1)
    block = randomize_(make(name)).train()
    x = torch.randn(4, C, 5, 5)
    ref = block(x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref)


@pytest.mark.parametrize("name", ALL)
def test_device_and_dtype_factory_kwargs(name):
    block = make(name, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in block.parameters())
