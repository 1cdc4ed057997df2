"""tritonbn.SyncBatchNorm over 2 and 3 gloo processes on CPU, against one process's torch BatchNorm.

Each world is spawned once (module-scoped fixture) and runs every case; the ranks hold uneven
slices of one batch, some empty. The parent runs torch.nn.BatchNorm in float64 on the whole batch
and compares outputs, input gradients, summed weight/bias gradients, running statistics and
num_batches_tracked. Inputs come from seeded generators, so parent and children build the same
data without shipping it; results come back as files.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn.functional import torch_activation
from tritonbn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

COLLECTIVE_TIMEOUT = timedelta(seconds=30)
JOIN_TIMEOUT_S = 90.0
EPS = 1e-5

# Rows of the batch on each rank, per world size: uneven, one rank with a single row, one empty.
WORLD_ROWS = {2: (4, 1), 3: (3, 5, 0)}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # (C, *spatial)
    dtype: str = "float64"
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    channels_last: bool = False
    offset: float = 3.0  # added to the inputs: E[x²] − E[x]² would lose the variance at 1e4
    rows: dict[int, tuple[int, ...]] = field(default_factory=lambda: WORLD_ROWS)
    steps: int = 3
    activation: str | None = None
    residual: bool = False  # a residual added before the activation (tritonbn.fuse's blocks)


CASES = (
    Case("2d", (4,)),
    Case("3d-cumulative-average", (3, 5), momentum=None),
    Case("4d", (3, 4, 5), momentum=0.3),
    Case("4d-float32-channels_last", (3, 4, 5), dtype="float32", channels_last=True),
    Case("2d-float32-offset-1e4", (4,), dtype="float32", offset=1e4),
    Case("4d-bfloat16-input", (3, 2, 3), dtype="bfloat16"),
    Case("5d-no-affine-no-running-stats", (2, 2, 3, 3), affine=False, track_running_stats=False),
    Case("2d-all-ranks-empty", (4,), rows={2: (0, 0), 3: (0, 0, 0)}, steps=2),
    Case("4d-fused-silu", (3, 2, 3), activation="silu"),
    Case("4d-fused-relu-residual", (3, 2, 3), activation="relu", residual=True),
)
CASE_BY_NAME = {case.name: case for case in CASES}
ONE_VALUE_ROWS = {2: (1, 0), 3: (0, 1, 0)}
TOLERANCES = {
    "float64": {"rtol": 1e-10, "atol": 1e-10},
    "float32": {"rtol": 1e-5, "atol": 2e-5},
    "bfloat16": {"rtol": 2e-2, "atol": 5e-2},
}


def _tolerance(case: Case) -> dict[str, float]:
    """The input dtype's tolerance; float32 at a large offset is bounded by the mean's rounding."""
    if case.offset >= 1e3:
        return {"rtol": 1e-3, "atol": 5e-3}
    return TOLERANCES[case.dtype]


def _module_dtype(case: Case) -> torch.dtype:
    """float64 modules for float64 input; float32 parameters and statistics otherwise."""
    return torch.float64 if case.dtype == "float64" else torch.float32


def _case_data(case: Case, world_size: int) -> dict[str, Any]:
    """The global batch of every step, its output gradient and the affine parameters."""
    generator = torch.Generator().manual_seed(1000 + CASES.index(case) * 10 + world_size)
    dtype = getattr(torch, case.dtype)
    total = sum(case.rows[world_size])

    def draw(*size: int, offset: float = 0.0) -> torch.Tensor:
        values = torch.randn(*size, generator=generator, dtype=torch.float64) * 2.0 + offset
        return values.to(dtype).to(torch.float64)  # exactly representable in the case's dtype

    channels = case.shape[0]
    return {
        "x": [draw(total, *case.shape, offset=case.offset) for _ in range(case.steps)],
        "dy": [draw(total, *case.shape) for _ in range(case.steps)],
        "x_eval": draw(total, *case.shape, offset=case.offset),
        "weight": draw(channels) if case.affine else None,
        "bias": draw(channels) if case.affine else None,
        "residual": [draw(total, *case.shape) if case.residual else None for _ in range(case.steps)],
    }


def _rank_slice(tensor: torch.Tensor, rows: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(rows[:rank])
    return tensor[start : start + rows[rank]]


def _build_model() -> nn.Sequential:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5, momentum=None),
    ).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def _model_batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(500 + world_size)
    total = sum(WORLD_ROWS[world_size])
    return [
        (
            torch.randn(total, 2, 4, 4, generator=generator, dtype=torch.float64) + 1.0,
            torch.randn(total, 5, generator=generator, dtype=torch.float64),
        )
        for _ in range(2)
    ]


# ---- what each rank runs ---------------------------------------------------------------------


def _run_case(case: Case, rank: int, world_size: int) -> dict[str, Any]:
    data = _case_data(case, world_size)
    rows = case.rows[world_size]
    dtype = getattr(torch, case.dtype)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    bn = SyncBatchNorm(
        case.shape[0],
        EPS,
        case.momentum,
        case.affine,
        case.track_running_stats,
        dtype=_module_dtype(case),
        activation=case.activation,
    )
    if case.affine:
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
    result: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": [], "dr": [], "y_channels_last": []}
    for x_global, dy_global, r_global in zip(data["x"], data["dy"], data["residual"], strict=True):
        x = _rank_slice(x_global, rows, rank).to(dtype).contiguous(memory_format=memory_format)
        x.requires_grad_(True)
        if r_global is None:
            y = bn(x)
        else:
            r = _rank_slice(r_global, rows, rank).to(dtype).contiguous(memory_format=memory_format)
            y = bn(x, residual=r.requires_grad_(True))
        (y * _rank_slice(dy_global, rows, rank).to(dtype)).sum().backward()
        result["y"].append(y.detach().double())
        result["y_channels_last"].append(y.is_contiguous(memory_format=torch.channels_last))
        result["dx"].append(x.grad.double())
        result["dr"].append(None if r_global is None else r.grad.double())
        if case.affine:
            result["dw"].append(bn.weight.grad.double())
            result["db"].append(bn.bias.grad.double())
            bn.weight.grad = bn.bias.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffer = getattr(bn, name)
        result[name] = None if buffer is None else buffer.clone()
    bn.eval()
    with torch.no_grad():
        result["y_eval"] = bn(_rank_slice(data["x_eval"], rows, rank).to(dtype)).double()
    return result


def _run_one_value_per_channel(rank: int, world_size: int) -> dict[str, Any]:
    """One row in the whole group: every rank must raise, and leave the module's state alone."""
    bn = SyncBatchNorm(4, dtype=torch.float64)
    x = torch.randn(ONE_VALUE_ROWS[world_size][rank], 4, dtype=torch.float64)
    try:
        bn(x)
        error = None
    except ValueError as exc:
        error = str(exc)
    return {"error": error, **{name: buffer.clone() for name, buffer in bn.named_buffers()}}


def _run_converted_model(rank: int, world_size: int) -> dict[str, Any]:
    rows = WORLD_ROWS[world_size]
    model = _build_model()
    params_before = dict(model.named_parameters())
    model = convert_sync_batchnorm(model)
    result: dict[str, Any] = {
        "types": [type(module).__name__ for module in model],
        "same_parameters": all(param is params_before[name] for name, param in model.named_parameters()),
        "out": [],
        "grads": [],
    }
    for x_global, dy_global in _model_batches(world_size):
        out = model(_rank_slice(x_global, rows, rank))
        (out * _rank_slice(dy_global, rows, rank)).sum().backward()
        result["out"].append(out.detach())
        result["grads"].append({name: param.grad.clone() for name, param in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    result["buffers"] = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return result


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: join the gloo group on loopback, run every scenario, save the results."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        results = {case.name: _run_case(case, rank, world_size) for case in CASES}
        results["one-value-per-channel"] = _run_one_value_per_channel(rank, world_size)
        results["converted-model"] = _run_converted_model(rank, world_size)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---- the parent side ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_world(world_size: int, out_dir: Path) -> list[dict[str, Any]]:
    context = mp.start_processes(
        _worker,
        args=(world_size, _free_port(), str(out_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world_size}-rank world did not finish within {JOIN_TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def world(request, tmp_path_factory) -> tuple[int, list[dict[str, Any]]]:
    """(world size, each rank's results), from one spawn of that many gloo processes."""
    world_size = request.param
    return world_size, _spawn_world(world_size, tmp_path_factory.mktemp(f"world{world_size}"))


def _reference_module(case: Case) -> nn.modules.batchnorm._BatchNorm:
    classes = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}
    return classes[len(case.shape)](
        case.shape[0],
        EPS,
        case.momentum,
        case.affine,
        case.track_running_stats,
        dtype=torch.float64,
    )


def _reference_run(case: Case, world_size: int) -> dict[str, Any]:
    """Single-process torch BatchNorm (then the case's activation) in float64 on the whole batch,
    the same steps."""
    data = _case_data(case, world_size)
    bn = _reference_module(case)

    def forward(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = bn(x)
        return torch_activation(y if residual is None else y + residual, case.activation, 0.01)

    if case.affine:
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
    expected: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": [], "dr": []}
    for x_global, dy_global, r_global in zip(data["x"], data["dy"], data["residual"], strict=True):
        x = x_global.clone().requires_grad_(True)
        r = None if r_global is None else r_global.clone().requires_grad_(True)
        y = forward(x, r)
        (y * dy_global).sum().backward()
        expected["y"].append(y.detach())
        expected["dx"].append(x.grad)
        expected["dr"].append(None if r is None else r.grad)
        if case.affine:
            expected["dw"].append(bn.weight.grad.clone())
            expected["db"].append(bn.bias.grad.clone())
            bn.weight.grad = bn.bias.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        expected[name] = getattr(bn, name)
    bn.eval()
    with torch.no_grad():
        if case.track_running_stats:
            expected["y_eval"] = forward(data["x_eval"])
        else:
            # Without running statistics, eval normalizes each rank's slice by itself (no sync).
            rows = case.rows[world_size]
            expected["y_eval"] = torch.cat(
                [forward(_rank_slice(data["x_eval"], rows, rank)) for rank in range(world_size)]
            )
    return expected


@pytest.mark.parametrize("case_name", list(CASE_BY_NAME))
def test_training_matches_single_process_batch_norm(world, case_name):
    world_size, results = world
    case = CASE_BY_NAME[case_name]
    ranks = [result[case_name] for result in results]
    expected = _reference_run(case, world_size)
    tol = _tolerance(case)
    for step in range(case.steps):
        torch.testing.assert_close(torch.cat([r["y"][step] for r in ranks]), expected["y"][step], **tol)
        torch.testing.assert_close(torch.cat([r["dx"][step] for r in ranks]), expected["dx"][step], **tol)
        if case.residual:
            torch.testing.assert_close(torch.cat([r["dr"][step] for r in ranks]), expected["dr"][step], **tol)
        if case.affine:
            # Each rank returns its local share; the shares add up to the whole batch's gradient.
            grad_tol = {key: value * 10 for key, value in tol.items()}
            torch.testing.assert_close(sum(r["dw"][step] for r in ranks), expected["dw"][step], **grad_tol)
            torch.testing.assert_close(sum(r["db"][step] for r in ranks), expected["db"][step], **grad_tol)
        if case.channels_last:
            assert all(r["y_channels_last"][step] for r in ranks if r["y"][step].numel() > 0)


@pytest.mark.parametrize("case_name", list(CASE_BY_NAME))
def test_running_statistics_match_and_agree_bitwise_across_ranks(world, case_name):
    world_size, results = world
    case = CASE_BY_NAME[case_name]
    ranks = [result[case_name] for result in results]
    expected = _reference_run(case, world_size)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if expected[name] is None:
            assert all(r[name] is None for r in ranks)
            continue
        for rank in ranks:
            torch.testing.assert_close(rank[name].double(), expected[name].double(), **_tolerance(case))
            # The merge runs in rank order on identical inputs: every rank holds the same bits.
            assert torch.equal(rank[name], ranks[0][name])


@pytest.mark.parametrize("case_name", list(CASE_BY_NAME))
def test_eval_matches_single_process_batch_norm(world, case_name):
    world_size, results = world
    case = CASE_BY_NAME[case_name]
    expected = _reference_run(case, world_size)
    actual = torch.cat([result[case_name]["y_eval"] for result in results])
    torch.testing.assert_close(actual, expected["y_eval"], **_tolerance(case))


def test_one_value_per_channel_in_the_whole_group_raises_on_every_rank(world):
    _, results = world
    for result in results:
        outcome = result["one-value-per-channel"]
        assert outcome["error"] is not None
        assert "more than 1 value per channel" in outcome["error"]
        assert int(outcome["num_batches_tracked"]) == 0
        assert torch.equal(outcome["running_mean"], torch.zeros(4, dtype=torch.float64))
        assert torch.equal(outcome["running_var"], torch.ones(4, dtype=torch.float64))


def test_converted_model_trains_like_the_single_process_model(world):
    world_size, results = world
    ranks = [result["converted-model"] for result in results]
    for rank in ranks:
        assert rank["types"][1] == rank["types"][5] == "SyncBatchNorm"
        assert rank["same_parameters"]
    model = _build_model()
    for step, (x_global, dy_global) in enumerate(_model_batches(world_size)):
        out = model(x_global)
        (out * dy_global).sum().backward()
        torch.testing.assert_close(torch.cat([r["out"][step] for r in ranks]), out.detach())
        for name, param in model.named_parameters():
            # Every parameter's local gradients (the BN layers' included) sum to the whole batch's.
            total = sum(r["grads"][step][name] for r in ranks)
            torch.testing.assert_close(total, param.grad, rtol=1e-9, atol=1e-9, msg=name)
        model.zero_grad(set_to_none=True)
    for name, buffer in model.named_buffers():
        for rank in ranks:
            torch.testing.assert_close(rank["buffers"][name], buffer, rtol=1e-10, atol=1e-10, msg=name)


# ---- single process: no process group -----------------------------------------------------------


def test_without_a_process_group_it_is_plain_batch_norm():
    assert not dist.is_initialized()
    bn = SyncBatchNorm(3, momentum=None, dtype=torch.float64)
    reference = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(4, 3, 2, 5, dtype=torch.float64) * 3 + 1
        dy = torch.randn_like(x)
        x_ours = x.clone().requires_grad_(True)
        x_ref = x.clone().requires_grad_(True)
        y_ours, y_ref = bn(x_ours), reference(x_ref)
        (y_ours * dy).sum().backward()
        (y_ref * dy).sum().backward()
        torch.testing.assert_close(y_ours, y_ref)
        torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, reference.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(reference, name))


def test_input_of_any_rank_from_two_up_as_in_torch():
    # torch's SyncBatchNorm takes (N, C, *) of any rank; so does this one, 6-D included.
    bn = SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(2, 3, 2, 1, 3, 2, dtype=torch.float64)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    want = F.batch_norm(x, mean, var, bn.weight, bn.bias, training=True)
    torch.testing.assert_close(bn(x), want)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)


def test_a_refused_dispatch_leaves_the_batch_count_alone(monkeypatch):
    monkeypatch.setattr(tritonbn.dispatch, "launches_cpu_tensors", lambda: False)
    bn = SyncBatchNorm(3)
    with tritonbn.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bn(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))


def test_has_torch_sync_batch_norms_state_dict_and_attributes():
    ours, theirs = SyncBatchNorm(5, process_group="group"), nn.SyncBatchNorm(5)
    # Not a subclass: DistributedDataParallel refuses any torch SyncBatchNorm on the CPU.
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, nn.SyncBatchNorm)
    assert ours.process_group == "group"
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize(
    ("make_input", "error"),
    [
        (lambda: torch.randn(6), ValueError),
        (lambda: torch.randn(4, 5), RuntimeError),
        (lambda: torch.randint(0, 5, (4, 3)), NotImplementedError),
        (lambda: torch.randn(1, 3), ValueError),
        (lambda: [[1.0, 2.0, 3.0]], TypeError),
    ],
    ids=["1d", "wrong-channels", "integer", "one-value-per-channel", "not-a-tensor"],
)
def test_bad_input_raises_before_any_state_changes(make_input, error):
    bn = SyncBatchNorm(3)
    before = {name: buffer.clone() for name, buffer in bn.named_buffers()}
    with pytest.raises(error):
        bn(make_input())
    for name, buffer in bn.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_features": 0}, ValueError),
        ({"num_features": 3, "eps": -1e-5}, ValueError),
        ({"num_features": True}, ValueError),
        ({"num_features": 3, "eps": "small"}, TypeError),
        ({"num_features": 3, "momentum": 1.5}, ValueError),
    ],
)
def test_bad_options_raise(kwargs, error):
    with pytest.raises(error):
        SyncBatchNorm(**kwargs)


@pytest.mark.parametrize(
    "make_bn",
    [
        lambda: nn.BatchNorm1d(4, momentum=None),
        lambda: nn.BatchNorm3d(4, affine=False),
        lambda: tritonbn.BatchNorm2d(4, eps=1e-3),
        lambda: nn.BatchNorm2d(4, track_running_stats=False),
    ],
    ids=["torch-1d", "torch-3d-no-affine", "tritonbn-2d", "no-running-stats"],
)
def test_convert_keeps_parameters_buffers_and_mode(make_bn):
    bn = make_bn().double().eval()
    if bn.weight is not None:
        bn.weight.requires_grad_(False)
    group = object()
    converted = convert_sync_batchnorm(bn, process_group=group)
    assert type(converted) is SyncBatchNorm
    assert converted.process_group is group
    assert not converted.training
    assert (converted.eps, converted.momentum, converted.affine, converted.track_running_stats) == (
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
    )
    for name, tensor in [*bn.named_parameters(), *bn.named_buffers()]:
        assert getattr(converted, name) is tensor, name
    assert dict(converted.named_parameters()).keys() == dict(bn.named_parameters()).keys()
    if bn.weight is not None:
        assert not converted.weight.requires_grad
        assert converted.weight.dtype == torch.float64


def test_convert_replaces_nested_layers_in_place_and_returns_the_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)), nn.ReLU())
    inner_weight = model[1][0].weight
    assert convert_sync_batchnorm(model) is model
    assert type(model[1][0]) is SyncBatchNorm
    assert model[1][0].weight is inner_weight
    assert type(model[0]) is nn.Linear


def test_convert_keeps_a_fused_activation():
    torch.manual_seed(0)
    model = tritonbn.convert(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LeakyReLU(0.2)), fuse_activations=True
    )
    x = torch.randn(6, 3)
    expected = model(x)
    convert_sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNorm
    assert (model[1].activation, model[1].negative_slope) == ("leaky_relu", 0.2)
    assert "activation='leaky_relu'" in repr(model[1])
    torch.testing.assert_close(model(x), expected)


def test_convert_keeps_a_fused_resnet_block_working():
    # tritonbn.fuse makes a block call bn2(out, residual=identity): the SyncBatchNorm that
    # replaces bn2 takes the residual too.
    resnet = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    block = resnet.BasicBlock(4, 4).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    expected = block(x)
    fused = convert_sync_batchnorm(tritonbn.fuse(nn.Sequential(block)))
    assert type(fused[0].bn2) is SyncBatchNorm and fused[0].bn2.activation == "relu"
    torch.testing.assert_close(fused(x), expected)


def test_a_bad_residual_raises_before_the_batch_is_counted():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="'residual' must have the input's shape"):
        bn(torch.randn(4, 3), residual=torch.randn(4, 2))
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm2d, tritonbn.LazyBatchNorm2d])
def test_convert_refuses_a_lazy_batchnorm_before_its_first_input_and_takes_it_after(lazy):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), lazy())
    with pytest.raises(ValueError, match=r"Lazy layer '3' \(LazyBatchNorm2d\) has not seen an input yet"):
        convert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and isinstance(model[3], lazy), "nothing is replaced"
    model(torch.randn(2, 1, 5, 5))
    convert_sync_batchnorm(model)
    assert [type(model[i]) for i in (1, 3)] == [SyncBatchNorm, SyncBatchNorm]


def test_convert_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        convert_sync_batchnorm("model")
