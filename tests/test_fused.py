"""The fused GPU paths of the gate blocks (visattn/layers/_fused.py).

On CPU: which path a block takes (plain on CPU; fused when the input is on CUDA, with the device
check stood in for), the switches that force the plain path (VISATTN_FUSED=0, set_fused(False),
attention capture, an outer torch.compile, a compile failure), and that each pure function is the
block's math (outputs, gradients, BatchNorm statistics) in NCHW and channels-last, float32 and
bfloat16, training and eval. On CUDA (skipped without one): the compiled kernels against the plain
path in float32, bfloat16 and float16.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import visattn
from visattn.layers import _fused, fused_enabled, set_fused
from visattn.layers._capture import Capture

# (name, kwargs): every fused block, and the variants whose math differs
VARIANTS = [
    ("se", {}),
    ("eca", {}),
    ("eca", {"circular": True, "kernel_size": 5}),
    ("cbam", {}),
    ("cbam", {"act_layer": "silu", "mlp_bias": True}),
    ("scse", {}),
    ("scse", {"mode": "max"}),
    ("gc", {}),
    ("gc", {"fusion": "both"}),
    ("gc", {"fusion": "scale", "use_attn": False}),
]
IDS = [n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in VARIANTS]
C = 16


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv("VISATTN_FUSED", raising=False)
    set_fused(None)
    _fused._failed.clear()
    yield
    set_fused(None)
    _fused._failed.clear()


def _block(name: str, kw: dict, *, train: bool, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A block with random (not initial) parameters and BatchNorm statistics, so every term counts
    (GC's zero-initialised output conv would hide its whole transform)."""
    torch.manual_seed(seed)
    block = visattn.create_block(name, C, **kw)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.4)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return block.to(dtype).train(train)


def _input(dtype, channels_last: bool, shape=(3, C, 6, 7), seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Spy:
    """Stands in for ``_fused._compiled``: records the kinds asked for and runs the pure function
    uncompiled (an Inductor compile costs ~35 s on these CPUs; it is tested on CUDA and in the
    slow test below)."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name: str):
        fn = _fused.PURE[name]

        def run(*args):
            self.calls.append(name)
            return fn(*args)
        return run


@pytest.fixture
def as_cuda(monkeypatch) -> _Spy:
    """Every input counts as a CUDA input with a usable compiler; the 'compiled' function is the
    uncompiled pure function, recorded."""
    spy = _Spy()
    monkeypatch.setattr(_fused, "_on_cuda", lambda x: True)
    monkeypatch.setattr(_fused, "_compile_usable", lambda device_type: True)
    monkeypatch.setattr(_fused, "_compiled", spy)
    return spy


def _tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def _grad_tol(dtype):
    """Gradients in bfloat16 are sums of rounded products over the map (parameters) or over the
    channels (scSE's spatial gate), and scSE's ``max`` mode routes a near-tie to either branch
    once the two sides round differently: a wider tolerance there; float32 stays tight."""
    return _tol(dtype) if dtype == torch.float32 else {"atol": 1e-1, "rtol": 1e-1}


# --------------------------------------------------------------------------------------------------
# The reference math: pure function == the block's plain forward.


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_pure_function_is_the_block_math(name, kw, channels_last, dtype, train):
    plain = _block(name, kw, train=train, dtype=dtype)
    ours = copy.deepcopy(plain)
    x = _input(dtype, channels_last).requires_grad_(train)
    x2 = x.detach().clone().requires_grad_(train)
    found = _fused.pure_function(ours, x2)
    assert found is not None, f"{name} {kw} has no pure function"
    fn, args = found
    y_plain = plain(x)
    y = fn(x2, *args)
    assert y.shape == y_plain.shape and y.dtype == y_plain.dtype
    torch.testing.assert_close(y, y_plain, **_tol(dtype))
    if train:
        g = torch.randn_like(y_plain)
        y_plain.backward(g)
        y.backward(g)
        torch.testing.assert_close(x2.grad, x.grad, **_grad_tol(dtype))
        # scSE max in bf16: a near-tie that rounds the other way moves a whole x * g term from one
        # gate's parameter gradients to the other's; only float32 checks those
        tie_prone = kw.get("mode") == "max" and dtype != torch.float32
        for (pn, p), (_, q) in zip(plain.named_parameters(), ours.named_parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), pn
            if p.grad is not None and not tie_prone:
                torch.testing.assert_close(q.grad, p.grad, **_grad_tol(dtype), msg=lambda m, pn=pn: f"{pn}: {m}")
    # BatchNorm running statistics move alike (CBAM's spatial BN in training)
    for (bn_name, b), (_, b2) in zip(plain.named_buffers(), ours.named_buffers(), strict=True):
        if "num_batches_tracked" not in bn_name:
            torch.testing.assert_close(b2, b, **_tol(dtype))


@pytest.mark.parametrize(("name", "kw"), [v for v in VARIANTS if not v[1]], ids=[v[0] for v in VARIANTS if not v[1]])
def test_pure_function_under_autocast(name, kw):
    """bf16-mixed training: float32 parameters, autocast casting per operation."""
    plain = _block(name, kw, train=True)
    ours = copy.deepcopy(plain)
    x = _input(torch.float32, True)
    fn, args = _fused.pure_function(ours, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y = plain(x), fn(x, *args)
    torch.testing.assert_close(y.float(), y_plain.float(), atol=5e-2, rtol=5e-2)


def test_cbam_single_value_per_channel_uses_running_statistics():
    """SafeBatchNorm2d with batch 1 on a 1x1 map: running statistics, untouched, in training."""
    plain = _block("cbam", {}, train=True)
    ours = copy.deepcopy(plain)
    x = _input(torch.float32, False, shape=(1, C, 1, 1))
    fn, args = _fused.pure_function(ours, x)
    torch.testing.assert_close(fn(x, *args), plain(x))
    torch.testing.assert_close(ours.spatial.bn.running_mean, plain.spatial.bn.running_mean)


def test_every_fused_block_has_a_pure_function():
    assert sorted(_fused.PURE) == sorted(_fused.FUSED_BLOCKS)
    assert sorted(name for name, *_ in _fused._table().values()) == sorted(_fused.FUSED_BLOCKS)
    for name in _fused.FUSED_BLOCKS:
        assert type(visattn.create_block(name, C)) in _fused._table()


def test_unknown_activation_or_replaced_part_has_no_pure_function():
    class Mish2(nn.Module):
        def forward(self, x):
            return x * torch.tanh(nn.functional.softplus(x))

    x = _input(torch.float32, False)
    assert _fused.pure_function(visattn.create_block("se", C, act_layer=Mish2), x) is None
    assert _fused.pure_function(visattn.create_block("simam", C), x) is None  # no fused path
    block = visattn.create_block("se", C)
    block.fc1.register_forward_hook(lambda m, i, o: o * 2)
    assert _fused.pure_function(block, x) is None  # a hooked part runs only on the plain path
    block = visattn.create_block("cbam", C)
    block.spatial.bn = nn.GroupNorm(1, 1)
    assert _fused.pure_function(block, x) is None


# --------------------------------------------------------------------------------------------------
# Dispatch.


@pytest.mark.parametrize("name", _fused.FUSED_BLOCKS)
def test_plain_path_on_cpu(name, monkeypatch):
    def no_compile(kind):
        raise AssertionError(f"the fused path was asked for on CPU ({kind})")

    monkeypatch.setattr(_fused, "_compiled", no_compile)
    block = _block(name, {}, train=True)
    x = _input(torch.float32, False)
    assert _fused.fused_forward(block, x) is None
    assert block(x).shape == x.shape


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", _fused.FUSED_BLOCKS)
def test_fused_path_chosen_for_cuda_inputs(name, train, as_cuda):
    plain = _block(name, {}, train=train)
    ours = copy.deepcopy(plain)
    x = _input(torch.float32, True)
    with torch.set_grad_enabled(train):
        y, y_plain = ours(x), plain._forward(x)
    assert as_cuda.calls == [name]
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
    # the block's state moves as on the plain path (CBAM: num_batches_tracked counted once)
    for (k, b), (_, b2) in zip(plain.state_dict().items(), ours.state_dict().items(), strict=True):
        torch.testing.assert_close(b2, b, atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_fused_result_keeps_input_dtype_under_autocast(as_cuda):
    block = _block("se", {}, train=True)
    x = _input(torch.bfloat16, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert as_cuda.calls == ["se"] and y.dtype == torch.bfloat16


def test_switch_off_by_function(as_cuda):
    block, x = _block("cbam", {}, train=False), _input(torch.float32, False)
    set_fused(False)
    assert not fused_enabled()
    block(x)
    assert as_cuda.calls == []
    set_fused(True)
    block(x)
    assert as_cuda.calls == ["cbam"]


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_switch_off_by_environment(value, as_cuda, monkeypatch):
    block, x = _block("eca", {}, train=False), _input(torch.float32, False)
    monkeypatch.setenv("VISATTN_FUSED", value)
    assert not fused_enabled()
    block(x)
    assert as_cuda.calls == []
    set_fused(True)  # the function overrides the environment
    block(x)
    assert as_cuda.calls == ["eca"]


def test_set_fused_checks_its_argument():
    with pytest.raises(TypeError, match="set_fused"):
        set_fused("off")
    with pytest.raises(TypeError, match="set_fused"):
        set_fused(0)


@pytest.mark.parametrize("name", _fused.FUSED_BLOCKS)
def test_capture_forces_the_plain_path(name, as_cuda):
    block, x = _block(name, {}, train=False), _input(torch.float32, False)
    block._capture = Capture()
    block(x)
    assert as_cuda.calls == []


def test_outer_compile_takes_the_plain_path(as_cuda, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _block("se", {}, train=False)(_input(torch.float32, False))
    assert as_cuda.calls == []


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit:FutureWarning")
def test_tracing_and_function_transforms_take_the_plain_path(as_cuda):
    block = _block("se", {}, train=False)
    x = _input(torch.float32, False)
    traced = torch.jit.trace(nn.Sequential(block), x, check_trace=False)
    assert as_cuda.calls == []
    assert "aten::mean" in str(traced.inlined_graph)  # the plain operations were recorded
    torch.testing.assert_close(traced(x), block._forward(x))
    as_cuda.calls.clear()
    y = torch.func.vmap(lambda t: block(t[None])[0])(x)
    assert as_cuda.calls == []
    torch.testing.assert_close(y, block._forward(x))


def test_no_compiler_takes_the_plain_path(as_cuda, monkeypatch):
    monkeypatch.setattr(_fused, "_compile_usable", lambda device_type: False)
    _block("se", {}, train=False)(_input(torch.float32, False))
    assert as_cuda.calls == []


def test_compile_failure_falls_back_once_with_a_warning(monkeypatch):
    asked = []

    def broken(name):
        def run(*args):
            asked.append(name)
            raise RuntimeError("triton: no compiler for this GPU")
        return run

    monkeypatch.setattr(_fused, "_on_cuda", lambda x: True)
    monkeypatch.setattr(_fused, "_compile_usable", lambda device_type: True)
    monkeypatch.setattr(_fused, "_compiled", broken)
    block = _block("cbam", {}, train=True)
    plain = copy.deepcopy(block)
    x = _input(torch.float32, False)
    with pytest.warns(RuntimeWarning, match="fused cbam kernel could not be built.*no compiler"):
        y = block(x)
    torch.testing.assert_close(y, plain(x))
    assert block.spatial.bn.num_batches_tracked.item() == 1  # counted once, by the plain path
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        block(x)  # no second warning, no second try
    assert asked == ["cbam"]


def test_out_of_memory_is_not_swallowed(monkeypatch):
    def oom(name):
        def run(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return run

    monkeypatch.setattr(_fused, "_on_cuda", lambda x: True)
    monkeypatch.setattr(_fused, "_compile_usable", lambda device_type: True)
    monkeypatch.setattr(_fused, "_compiled", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _block("se", {}, train=False)(_input(torch.float32, False))


# --------------------------------------------------------------------------------------------------
# Compiled: Inductor on CPU (slow) and on CUDA (skipped without a GPU).


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cbam", "gc"])
def test_compiled_pure_function_on_cpu(name):
    torch._dynamo.reset()
    plain = _block(name, {}, train=True)
    ours = copy.deepcopy(plain)
    x = _input(torch.float32, True)
    x2 = x.clone().requires_grad_()
    fn, args = _fused.pure_function(ours, x2)
    y = torch.compile(fn)(x2, *args)
    y_plain = plain(x.requires_grad_())
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    y_plain.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


# Every dtype and both memory formats, training and eval, across each block's three cases (each
# case is its own compile, a few seconds on the GPU machine: the whole matrix would cost minutes).
GPU_CASES = [(torch.float32, False, True), (torch.bfloat16, True, True), (torch.float16, True, False),
             (torch.float16, False, True)]


@cuda
@pytest.mark.parametrize(("dtype", "channels_last", "train"), GPU_CASES,
                         ids=["fp32-nchw-train", "bf16-cl-train", "fp16-cl-eval", "fp16-nchw-train"])
@pytest.mark.parametrize("name", _fused.FUSED_BLOCKS)
def test_fused_equals_plain_on_cuda(name, channels_last, dtype, train):
    plain = _block(name, {}, train=train, dtype=dtype).cuda()
    ours = copy.deepcopy(plain)
    x = _input(dtype, channels_last, shape=(4, C, 13, 11)).cuda()
    x2 = x.clone()
    x.requires_grad_(train)
    x2.requires_grad_(train)
    atol, rtol = GPU_TOL[dtype]
    with torch.set_grad_enabled(train):
        y = ours(x2)
        set_fused(False)
        y_plain = plain(x)
        set_fused(None)
    assert y.dtype == dtype and y.shape == x.shape
    assert name not in _fused._failed, f"the fused {name} kernel failed to build"
    torch.testing.assert_close(y, y_plain, atol=atol, rtol=rtol)
    if train:
        g = torch.randn_like(y)
        y.backward(g)
        y_plain.backward(g)
        torch.testing.assert_close(x2.grad, x.grad, atol=atol * 4, rtol=rtol * 4)
        for (pn, p), q in zip(plain.named_parameters(), ours.parameters(), strict=True):
            if p.grad is not None:
                # parameter gradients sum over the whole map: scale the tolerance with its size
                torch.testing.assert_close(q.grad, p.grad, atol=atol * 50, rtol=rtol * 4,
                                           msg=lambda m, pn=pn: f"{pn}: {m}")
    for (k, b), b2 in zip(plain.state_dict().items(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(b2, b, atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@cuda
def test_fused_detector_trains_on_cuda():
    """A few bf16-mixed, channels-last training steps of a small detector with CBAM through the
    fused path: finite losses, and the fused kernel was used (no fallback)."""
    from visattn.models import build_detector

    model = build_detector("fcos", backbone="resnet18", num_classes=3, attention="cbam",
                           min_size=128, max_size=128).cuda().train()
    model.backbone.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = [torch.rand(3, 128, 128, device="cuda") for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]], device="cuda"),
                "labels": torch.tensor([1], device="cuda")} for _ in range(2)]
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert "cbam" not in _fused._failed


# --------------------------------------------------------------------------------------------------
# benchmarks/gpu.py: without a GPU it says so and stops (a CPU run only as an explicit dry run).


def _gpu_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("visattn_gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_benchmark_refuses_without_cuda(capsys):
    bench = _gpu_benchmark()
    with pytest.raises(SystemExit) as e:
        bench.main([])
    assert e.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu"])
    assert "--quick" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--quick", "--sections", "blocks,nope"])
    assert "nope" in capsys.readouterr().err
