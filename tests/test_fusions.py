"""BatchNorm + residual add + activation in one pass, ``tritonbn.fuse`` on torchvision's ResNets,
and the memory-efficient mode (saving the output instead of the input), against torch's unfused
sequence in float64: values, gradients of every input and running statistics, on every backend
and every forced kernel plan (the Triton kernels through the interpreter, in float32)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn.reference import MIN_WEIGHT

from .helpers import assert_close

ACT = {"relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.1), None: lambda t: t}
TRAIN_PLANS = ("fused-small", "split-welford", "column-tiled")


def random_shape(rng: random.Random, channels_last: bool) -> tuple[int, ...]:
    """A small ragged shape: 2-D, or 4-D when ``channels_last`` (the column tiling's layouts),
    else 2- to 5-D."""
    n, c = rng.randint(2, 5), rng.randint(1, 7)
    if channels_last:
        return (n, c, rng.randint(1, 5), rng.randint(1, 6))
    return (n, c, *(rng.randint(1, 6) for _ in range(rng.randint(0, 3))))


def make_inputs(shape: tuple[int, ...], seed: int, channels_last: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    x = randn(*shape) * 2 + 0.5
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return {
        "x": x,
        "z": randn(*shape),
        "weight": 1 + 0.5 * randn(c),
        "bias": randn(c),
        "running_mean": randn(c),
        "running_var": 0.5 + torch.rand(c, generator=gen, dtype=torch.float64),
        "dy": randn(*shape),
    }


def oracle(inputs: dict[str, torch.Tensor], training: bool, activation: str | None):
    """float64 act(F.batch_norm(x) + z): (output, grads of x, z, weight, bias, running stats)."""
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("x", "z", "weight", "bias")}
    rm, rv = inputs["running_mean"].clone(), inputs["running_var"].clone()
    y = F.batch_norm(leaves["x"], rm, rv, leaves["weight"], leaves["bias"], training, 0.1, 1e-5)
    y = ACT[activation](y + leaves["z"])
    grads = torch.autograd.grad(y, list(leaves.values()), inputs["dy"])
    return y, dict(zip(leaves, grads, strict=True)), rm, rv


def run_fused(inputs, dtype, training, activation, **options):
    leaves = {k: inputs[k].to(dtype).clone().requires_grad_() for k in ("x", "z")}
    params = {
        k: inputs[k].float().clone().requires_grad_()
        if dtype != torch.float64
        else inputs[k].clone().requires_grad_()
        for k in ("weight", "bias")
    }
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = inputs["running_mean"].to(stat_dtype).clone(), inputs["running_var"].to(stat_dtype).clone()
    y = tritonbn.batch_norm(
        leaves["x"],
        rm,
        rv,
        params["weight"],
        params["bias"],
        training,
        0.1,
        1e-5,
        activation=activation,
        residual=leaves["z"],
        **options,
    )
    leaves.update(params)
    grads = torch.autograd.grad(y, list(leaves.values()), inputs["dy"].to(dtype))
    return y, dict(zip(leaves, grads, strict=True)), rm, rv


def check(inputs, dtype, training, activation, device=None, **options):
    """The fused call (on ``device``, default the inputs' CPU) against the float64 oracle."""
    y_ref, g_ref, rm_ref, rv_ref = oracle(inputs, training, activation)
    on_device = {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs
    y, g, rm, rv = run_fused(on_device, dtype, training, activation, **options)
    y, rm, rv = y.cpu(), rm.cpu(), rv.cpu()
    g = {k: v.cpu() for k, v in g.items()}
    n = inputs["x"].numel() // inputs["x"].shape[1]
    assert y.dtype == dtype and y.stride() == inputs["x"].to(dtype).stride()
    assert_close(y, y_ref, dtype, "y")
    for name in ("x", "z"):  # elementwise: the dtype's own tolerance
        assert_close(g[name], g_ref[name], dtype, f"d{name}")
    for name in ("weight", "bias"):  # sums over n elements
        assert_close(g[name], g_ref[name], dtype, f"d{name}", reduced=n)
    assert_close(rm, rm_ref, dtype, "running_mean")
    assert_close(rv, rv_ref, dtype, "running_var")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("seed", range(4))
def test_residual_matches_torch_float64(backend, seed):
    rng = random.Random(seed)
    inputs = make_inputs(random_shape(rng, False), seed)
    with tritonbn.backend(backend):
        for training in (True, False):
            for activation in ("relu", None):
                check(inputs, torch.float64, training, activation)


@pytest.mark.parametrize("plan", [*TRAIN_PLANS, "eval"])
@pytest.mark.parametrize("seed", range(2))
def test_residual_triton_every_plan(plan, seed, device):
    rng = random.Random(100 + seed)
    channels_last = plan == "column-tiled" and seed == 0
    shape = random_shape(rng, channels_last)
    if plan == "column-tiled" and not channels_last:
        shape = shape[:2]
    inputs = make_inputs(shape, seed, channels_last)
    with tritonbn.backend("triton", plan=plan):
        check(inputs, torch.float32, plan != "eval", "relu", device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_triton_half(dtype, device):
    inputs = make_inputs((4, 3, 5, 6), 7)
    with tritonbn.backend("triton"):
        check(inputs, dtype, True, "relu", device)


def test_residual_other_strides_and_grad_of_residual_only(device):
    # A channels_last residual on an NCHW input is copied to the input's strides; with only the
    # residual requiring grad, its gradient still comes out (dy·relu'(u)), with and without an
    # activation (dy itself).
    inputs = make_inputs((3, 4, 5, 6), 3)
    x = inputs["x"].float().to(device)
    z = inputs["z"].float().to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = inputs["dy"].float().to(device)
    for activation in ("relu", None):
        expected = ACT[activation](F.batch_norm(x, None, None, training=True) + z)
        (dz_ref,) = torch.autograd.grad(expected, z, dy)
        with tritonbn.backend("triton"):
            y = tritonbn.batch_norm(x, None, None, training=True, activation=activation, residual=z)
            (dz,) = torch.autograd.grad(y, z, dy)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-5)


def test_module_accepts_residual():
    bn = tritonbn.BatchNorm2d(4, activation="relu")
    ref = nn.BatchNorm2d(4)
    x, z = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn(x, residual=z), torch.relu(ref(x) + z))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    frozen = tritonbn.FrozenBatchNorm2d(4)
    torch.testing.assert_close(frozen(x, residual=z), x + z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("residual", "error", "match"),
    [
        (torch.randn(3, 4, 5), ValueError, "'residual' must have the input's shape"),
        (torch.randn(3, 4, 5, 5, dtype=torch.float64), TypeError, "'residual' must have the input's dtype"),
        ([1.0], TypeError, "'residual' must be a torch.Tensor"),
    ],
)
def test_bad_residual_raises_before_any_change(residual, error, match):
    bn = tritonbn.BatchNorm2d(4, activation="relu")
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error, match=match):
        bn(torch.randn(3, 4, 5, 5), residual=residual)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(error, match=match):
        tritonbn.batch_norm(torch.randn(3, 4, 5, 5), None, None, training=True, residual=residual)


# --- tritonbn.fuse on torchvision's ResNets ---------------------------------------------------


def models():
    """torchvision.models, or a skip without torchvision (an optional dependency)."""
    return pytest.importorskip("torchvision.models")


def train_steps(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outputs = []
    for x in batches:
        optimizer.zero_grad()
        out = model(x)
        out.square().mean().backward()
        optimizer.step()
        outputs.append(out.detach())
    return outputs


@pytest.mark.parametrize(
    ("arch", "backend"), [("resnet18", "torch"), ("resnet50", "torch"), ("resnet18", "reference")]
)
def test_fused_resnet_trains_like_stock_float64(arch, backend):
    tv = models()
    torch.manual_seed(0)
    stock = getattr(tv, arch)(num_classes=10).double()
    fused = tritonbn.fuse(copy.deepcopy(stock))
    block = fused.layer1[0]
    last = block.bn2 if arch == "resnet18" else block.bn3
    assert type(block).__name__ == ("FusedBasicBlock" if arch == "resnet18" else "FusedBottleneck")
    assert isinstance(block, tv.resnet.BasicBlock if arch == "resnet18" else tv.resnet.Bottleneck)
    assert last.activation == "relu" and block.bn1.activation == "relu"
    assert list(fused.state_dict()) == list(stock.state_dict())
    steps = 3 if arch == "resnet18" and backend == "torch" else 1
    batches = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(steps)]
    with tritonbn.backend(backend):
        fused_out = train_steps(fused, batches)
    stock_out = train_steps(stock, batches)
    # The torch backend runs the very ops of the stock blocks; the reference its own float64 ones.
    tol = {"rtol": 1e-9, "atol": 1e-9} if backend == "torch" else {"rtol": 1e-6, "atol": 1e-8}
    for a, b in zip(fused_out, stock_out, strict=True):
        torch.testing.assert_close(a, b, **tol)
    stock_state = stock.state_dict()
    for key, value in fused.state_dict().items():  # parameters after the steps, running stats
        torch.testing.assert_close(value, stock_state[key], **tol, msg=key)
    # Checkpoints go both ways.
    getattr(tv, arch)(num_classes=10).double().load_state_dict(fused.state_dict())
    fused.load_state_dict(stock_state)


@pytest.mark.slow
def test_fused_resnet_one_step_on_triton_float32(device, monkeypatch):
    # ResNet with one BasicBlock a stage (torchvision's class, ResNet-18's widths): one training
    # step on the Triton kernels against float64 torch, to float32's tolerance for BatchNorm over
    # 2 values a channel in layer4 (torch's own float32 is as far off). cuDNN's convolutions run in
    # TF32 by default (10-bit mantissa), which BatchNorm over 2 values magnifies: off here.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    models()
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    stock = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    fused = tritonbn.fuse(copy.deepcopy(stock)).to(device)
    oracle64 = copy.deepcopy(stock).double()
    x = torch.randn(2, 3, 16, 16)
    with tritonbn.backend("triton"):
        out = fused(x.to(device)).cpu()
        out.square().sum().backward()
    ref = oracle64(x.double())
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    for (name, p), q in zip(fused.named_parameters(), oracle64.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=0, atol=1e-2 * scale, msg=name)
    for (name, b), c in zip(fused.named_buffers(), oracle64.buffers(), strict=True):
        torch.testing.assert_close(b.double().cpu(), c.double(), rtol=1e-4, atol=1e-4, msg=name)


def test_fuse_leaves_hooked_and_other_blocks_alone():
    models()
    from torchvision.models.resnet import BasicBlock

    model = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), nn.BatchNorm2d(8), nn.ReLU())
    model[1].bn2.register_forward_hook(lambda *args: None)
    tritonbn.fuse(model)
    assert type(model[0]).__name__ == "FusedBasicBlock"
    assert type(model[1]) is BasicBlock and model[1].bn2.activation is None
    assert model[2].activation == "relu" and isinstance(model[3], nn.Identity)
    with pytest.raises(TypeError, match=r"'model' must be a torch\.nn\.Module"):
        tritonbn.fuse("resnet")


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_fused_block_under_autocast_takes_a_float32_identity_as_the_stock_block(block_name):
    # Under autocast the convolutions give bfloat16 while the block's input (the identity) may
    # be float32; torchvision's out += identity keeps the branch's dtype, and so does the fusion.
    models()
    from torchvision.models import resnet

    torch.manual_seed(0)
    stock = getattr(resnet, block_name)(16, 16 // (4 if block_name == "Bottleneck" else 1))
    fused = tritonbn.fuse(copy.deepcopy(stock))
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = stock(x), fused(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_fused_block_pickles():
    import io

    models()
    from torchvision.models.resnet import Bottleneck

    block = tritonbn.fuse(Bottleneck(16, 4))
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == "FusedBottleneck"
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(loaded(x), block(x))


# --- memory-efficient mode -------------------------------------------------------------------


def saved_activation_bytes(run, numel: int) -> int:
    """Bytes of the distinct activation-sized storages autograd saves while ``run()`` runs."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() == numel:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    del out
    return sum(storages.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_efficient_saves_half_the_activation_bytes(backend):
    shape = (4, 6, 5, 5)
    x = torch.randn(shape, requires_grad=True)
    plain = nn.Sequential(tritonbn.BatchNorm2d(6), nn.LeakyReLU(0.1))
    fused = tritonbn.BatchNorm2d(6, activation="leaky_relu", negative_slope=0.1)
    lean = tritonbn.BatchNorm2d(6, activation="leaky_relu", negative_slope=0.1, memory_efficient=True)
    conv = nn.Conv2d(6, 6, 1)  # the next layer, which saves its input
    one = x.numel() * x.element_size()
    with tritonbn.backend(backend):
        assert saved_activation_bytes(lambda: plain(x), x.numel()) == 2 * one
        assert saved_activation_bytes(lambda: lean(x), x.numel()) == one
        # Followed by a layer that keeps its input, the output is shared: the fused kernels still
        # hold their input besides, the memory-efficient module nothing more.
        if backend == "triton":
            assert saved_activation_bytes(lambda: conv(fused(x)), x.numel()) == 2 * one
        assert saved_activation_bytes(lambda: conv(lean(x)), x.numel()) == one
        dy = torch.randn(shape)
        grads = {}
        for name, module in (("plain", plain), ("lean", lean)):
            params = list(module.parameters())
            y = module(x)
            grads[name] = torch.autograd.grad(y, [x, *params], dy)
    for mine, theirs in zip(grads["lean"], grads["plain"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["leaky_relu", None])
@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (tritonbn.BatchNorm1d, (6, 3)),
        (tritonbn.BatchNorm2d, (3, 4, 5, 6)),
        (tritonbn.BatchNorm3d, (2, 3, 3, 2, 4)),
    ],
)
def test_memory_efficient_module_matches_plain_float64(cls, shape, activation):
    torch.manual_seed(1)
    plain = cls(shape[1], activation=activation, negative_slope=0.2, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(shape[1], dtype=torch.float64))
        plain.bias.copy_(torch.randn(shape[1], dtype=torch.float64))
    lean = cls(
        shape[1], activation=activation, negative_slope=0.2, memory_efficient=True, dtype=torch.float64
    )
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    for training in (True, False):
        plain.train(training)
        lean.train(training)
        outs = []
        for module in (plain, lean):
            y = module(x)
            outs.append((y, *torch.autograd.grad(y, [x, module.weight, module.bias], dy)))
        for mine, theirs in zip(outs[1], outs[0], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
    for a, b in zip(lean.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("plan", [*TRAIN_PLANS, "eval"])
def test_memory_efficient_triton_every_plan(plan, device):
    shape = (6, 5, 3, 4) if plan != "column-tiled" else (7, 5)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(device)
    weight, bias = torch.randn(5, generator=gen).to(device), torch.randn(5, generator=gen).to(device)
    dy = torch.randn(shape, generator=gen).to(device)
    training = plan != "eval"
    results = []
    for lean in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
        with tritonbn.backend("torch" if not lean else "triton", plan=None if not lean else plan):
            args = (leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5)
            y = tritonbn.batch_norm(
                *args, activation="leaky_relu", negative_slope=0.05, memory_efficient=lean
            )
        results.append((y, *torch.autograd.grad(y, leaves, dy), rm, rv))
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_efficient_weight_floor(backend):
    # |γ| < MIN_WEIGHT runs as ±MIN_WEIGHT (0 as +MIN_WEIGHT), so the output can be inverted, and
    # dγ passes straight through: a zero-initialized γ (ResNet's zero_init_residual) still learns.
    x = torch.randn(4, 3, 5, 5, dtype=torch.float32)
    dy = torch.randn_like(x)
    weight = torch.tensor([0.0, -1e-7, 0.7])
    floored = torch.tensor([MIN_WEIGHT, -MIN_WEIGHT, 0.7])
    bias = torch.randn(3)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with tritonbn.backend(backend):
        y = tritonbn.batch_norm(
            leaves[0], None, None, leaves[1], leaves[2], True, activation="leaky_relu", memory_efficient=True
        )
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, floored, bias)]
    ref = F.leaky_relu(F.batch_norm(ref_leaves[0], None, None, ref_leaves[1], ref_leaves[2], True))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    torch.testing.assert_close(y, ref)
    # x̂ = (z − β)/γ with γ = ±1e-5 loses about ulp(β)/1e-5 ≈ 1e-2 relative in float32.
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=1e-3)
    assert grads[1][0].abs() > 1e-3  # the zero γ gets a gradient


def test_memory_efficient_errors():
    for activation in ("relu", "sigmoid", "silu", "tanh"):
        with pytest.raises(ValueError, match="activation must be invertible"):
            tritonbn.BatchNorm2d(3, activation=activation, memory_efficient=True)
        with pytest.raises(ValueError, match="activation must be invertible"):
            tritonbn.batch_norm(
                torch.randn(4, 3), None, None, training=True, activation=activation, memory_efficient=True
            )
    for slope in (0.0, -0.1):
        with pytest.raises(ValueError, match="negative_slope > 0"):
            tritonbn.BatchNorm1d(3, activation="leaky_relu", negative_slope=slope, memory_efficient=True)
    with pytest.raises(TypeError, match="'memory_efficient' must be a bool"):
        tritonbn.LazyBatchNorm2d(memory_efficient=1)
    lean = tritonbn.BatchNorm2d(3, memory_efficient=True)
    assert "memory_efficient=True" in repr(lean)
    before = {k: v.clone() for k, v in lean.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="does not combine with 'residual'"):
        lean(x, residual=torch.randn_like(x))
    for key, value in lean.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", ["auto", "torch", "reference", "triton"])
def test_memory_efficient_refuses_create_graph(backend):
    # The saved output gives first derivatives only; a second backward must raise, not be wrong.
    lean = tritonbn.BatchNorm2d(3, activation="leaky_relu", memory_efficient=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with tritonbn.backend(backend):
        (grad,) = torch.autograd.grad(lean(x).pow(3).sum(), x)
        assert grad.isfinite().all()
        y = lean(x)
    with pytest.raises(RuntimeError, match=r"memory_efficient=True .* \(create_graph=True\)"):
        torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
