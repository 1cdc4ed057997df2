"""tritonbn-train end to end on small data: it learns, prints the seed notebook's lines, leaves a
run folder, resumes bit for bit, survives Ctrl-C and explains bad options and bad data."""

import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonbn
import tritonbn.train as train_module
from tritonbn import glue
from tritonbn.data import DEBIAN_DIR
from tritonbn.train import main

from .idx_files import write_idx

# the seed notebook's print-out, e.g. "epoch 1, loss 1.0037, train acc 0.783, test acc 0.836, time 15.5 sec"
SEED_LINE = "epoch 1, loss 1.0037, train acc 0.783, test acc 0.836, time 15.5 sec"
EPOCH_LINE = re.compile(
    r"epoch (?P<epoch>\d+), loss (?P<loss>\d+\.\d{4}), train acc (?P<train>[01]\.\d{3}), "
    r"test acc (?P<test>[01]\.\d{3}), time (?P<time>\d+\.\d) sec"
)
TIME_KEYS = {"time_sec", "train_time_sec", "eval_time_sec", "load_avg_1min"}
SHORT = ["--limit", "512", "--batch-size", "32", "--quiet"]


def write_learnable_set(folder: Path) -> Path:
    """Synthetic Fashion-MNIST-shaped data a LeNet learns in a few dozen steps: class k is a
    bright 7x7 square at cell k of a 4x4 grid over low noise."""
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for split, size in (("train", 1024), ("t10k", 256)):
        labels = torch.randint(0, 10, (size,), generator=generator)
        images = torch.randint(0, 80, (size, 28, 28), generator=generator)
        for index, label in enumerate(labels.tolist()):
            row, col = divmod(label, 4)
            images[index, row * 7 : row * 7 + 7, col * 7 : col * 7 + 7] += 150
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images.to(torch.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.to(torch.uint8))
    return folder


def run_cli(*argv: object) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A private cache, the learnable data set, and one uninterrupted 2-epoch run of it. The
    private cache shares the user's C++ glue folder, where there is one: on a GPU each new folder
    builds the glue again (33 s on the H200)."""
    root = tmp_path_factory.mktemp("train")
    built_glue = glue._cache_folder()
    if built_glue.is_dir():
        (root / "cache" / "tritonbn").mkdir(parents=True)
        (root / "cache" / "tritonbn" / "glue").symlink_to(built_glue, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        patch.delenv("TRITONBN_DATA", raising=False)
        data = write_learnable_set(root / "data")
        code, out, err = run_cli("--data-dir", data, *SHORT, "--epochs", 2, "--out", root / "full")
        assert code == 0, err
        yield {"root": root, "data": data, "full": root / "full", "full_stdout": out}


@pytest.fixture(autouse=True)
def _same_environment(workspace, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(workspace["root"] / "cache"))
    monkeypatch.delenv("TRITONBN_DATA", raising=False)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def without_times(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIME_KEYS} for record in epochs]


def assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert torch.equal(a["rng"]["shuffle"], b["rng"]["shuffle"])
    assert without_times(a["metrics"]) == without_times(b["metrics"])


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "tritonbn.train"], [str(Path(sys.executable).with_name("tritonbn-train"))]],
)
def test_help(command):
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} is not installed")
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--bn",
        "--device",
        "--data-dir",
        "--out",
        "--seed",
        "--resume",
        "--quiet",
        "--fuse",
        "--compile",
        "--distributed",
        "tritonbn,torch,reference",
    ):
        assert option in result.stdout
    assert "--limit" not in result.stdout


def test_uneven_shards_average_to_the_whole_batchs_gradient():
    # What DistributedDataParallel does with three processes' gradients (their mean), done by hand
    # on shards of 4, 3 and 3 rows of a 10-row batch: the whole batch's mean-loss gradient.
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    loss_fn = torch.nn.CrossEntropyLoss()
    whole = torch.autograd.grad(loss_fn(layer(x), y), layer.weight)[0]
    shards = torch.arange(10).tensor_split(3)
    per_process = [
        torch.autograd.grad(
            train_module.for_gradient(loss_fn(layer(x[s]), y[s]), s.numel(), 10, 3), layer.weight
        )[0]
        for s in shards
    ]
    torch.testing.assert_close(sum(per_process) / 3, whole)
    loss = loss_fn(layer(x), y)
    assert train_module.for_gradient(loss, 10, 10, 1) is loss  # one process: untouched
    assert train_module.for_gradient(loss, 5, 10, 2) is loss  # equal shards: untouched


def test_seed_line_pattern_matches_the_notebook():
    assert EPOCH_LINE.fullmatch(SEED_LINE)


def test_short_run_learns_and_prints_the_seed_format(workspace):
    lines = workspace["full_stdout"].splitlines()
    assert lines[0] == "training on cpu"
    matches = [EPOCH_LINE.fullmatch(line) for line in lines[1:]]
    assert len(matches) == 2 and all(matches), lines
    assert [int(m["epoch"]) for m in matches] == [1, 2]
    record = metrics(workspace["full"])
    for match, epoch in zip(matches, record["epochs"], strict=True):
        assert float(match["loss"]) == round(epoch["loss"], 4)
        assert float(match["test"]) == round(epoch["test_acc"], 3)
    # 10 classes: chance is 0.1; the synthetic classes are learnt within 32 steps
    last = record["epochs"][-1]
    assert last["train_acc"] > 0.5 and last["test_acc"] > 0.5
    assert last["loss"] < record["epochs"][0]["loss"]


def test_run_folder_contents(workspace):
    run_dir = workspace["full"]
    record = metrics(run_dir)
    assert record["config"] == {
        "epochs": 2,
        "batch_size": 32,
        "lr": 0.001,
        "bn": "tritonbn",
        "seed": 0,
        "limit": 512,
        "fuse": False,
        "compile": False,
    }
    assert record["distributed"] == {"world_size": 1, "backend": None}
    assert set(record["versions"]) == {"python", "torch", "torchvision", "triton", "tritonbn"}
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["data"] == {
        "origin": "--data-dir",
        "root": record["data"]["root"],
        "verified": "structure",
        "train_images": 512,
        "test_images": 256,
    }
    assert list(record["dispatch"]) == ["1", "5", "10", "13"]
    first = record["dispatch"]["1"]
    assert first["input_shape"] == [32, 6, 24, 24]
    assert first["train"]["backend"] == "torch" and "cpu tensor" in first["train"]["reason"]
    assert record["dispatch"]["13"]["eval"]["explain"].startswith("tritonbn plan: backend=torch")
    assert record["finished"] is True
    assert all(epoch["time_sec"] > 0 for epoch in record["epochs"])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = checkpoint(run_dir)
    assert state["epoch"] == 2 and len(state["metrics"]) == 2
    assert not list(run_dir.glob(".*tmp")), "temporary files left behind"


def test_resume_equals_uninterrupted(workspace, tmp_path):
    code, _, err = run_cli("--data-dir", workspace["data"], *SHORT, "--epochs", 1, "--out", tmp_path)
    assert code == 0, err
    first_epoch = without_times(checkpoint(workspace["full"])["metrics"][:1])
    assert without_times(checkpoint(tmp_path)["metrics"]) == first_epoch, "a fresh run must repeat epoch 1"
    code, out, err = run_cli(
        "--data-dir", workspace["data"], "--resume", "--epochs", 2, "--out", tmp_path, "--quiet"
    )
    assert code == 0, err
    assert EPOCH_LINE.fullmatch(out.splitlines()[-1])["epoch"] == "2"
    assert_same_state(checkpoint(tmp_path), checkpoint(workspace["full"]))
    assert without_times(metrics(tmp_path)["epochs"]) == without_times(metrics(workspace["full"])["epochs"])
    record = metrics(tmp_path)
    assert [s["after_epoch"] for s in record["sessions"]] == [0, 1]
    # The run's command is the one that started it; each session keeps its own.
    first = ["--data-dir", str(workspace["data"]), *SHORT, "--epochs", "1", "--out", str(tmp_path)]
    assert record["argv"] == record["sessions"][0]["argv"] == first
    assert record["sessions"][1]["argv"][1:4] == [str(workspace["data"]), "--resume", "--epochs"]
    assert set(record["sessions"][1]["versions"]) == set(record["versions"])


def test_ctrl_c_keeps_the_last_epoch_and_resumes(workspace, tmp_path, monkeypatch):
    real_train_epoch = train_module.train_epoch
    calls = []

    def interrupted_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", interrupted_in_epoch_two)
    code, _, err = run_cli("--data-dir", workspace["data"], *SHORT, "--epochs", 2, "--out", tmp_path)
    assert code == 130
    assert "interrupted in epoch 2" in err and "holds epoch 1" in err
    assert f"--resume --out {tmp_path}" in err
    assert checkpoint(tmp_path)["epoch"] == 1
    monkeypatch.setattr(train_module, "train_epoch", real_train_epoch)
    code, _, err = run_cli("--data-dir", workspace["data"], "--resume", "--out", tmp_path, "--quiet")
    assert code == 0, err
    assert_same_state(checkpoint(tmp_path), checkpoint(workspace["full"]))


def test_other_seed_other_weights_same_seed_same_weights(workspace, tmp_path):
    code, _, err = run_cli(
        "--data-dir", workspace["data"], *SHORT, "--epochs", 1, "--seed", 1, "--out", tmp_path
    )
    assert code == 0, err
    assert (
        metrics(tmp_path)["epochs"][0]["weights_sha256"]
        != metrics(workspace["full"])["epochs"][0]["weights_sha256"]
    )


def train_steps(
    batch_norm: str,
    *,
    backend: str | None = None,
    fuse: bool = False,
    compiled: bool = False,
    device: torch.device | None = None,
    steps: int = 2,
) -> tuple[float, float, dict]:
    """``steps`` steps of the trainer's ``train_epoch`` (SGD, so that a gradient's rounding moves a
    weight by as little, not by Adam's ±lr for a gradient near zero) on 8-image batches of the
    learnable set, then ``evaluate``: (loss, test accuracy, state_dict on the CPU)."""
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (8 * steps, 28, 28), generator=generator, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (8 * steps,), generator=generator).to(device)
    torch.manual_seed(2)
    model = train_module.LeNet(batch_norm).to(device)
    if fuse:
        train_module.convert(model, fuse_activations=True)
    net = train_module.compile_model(model, device) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = list(torch.arange(8 * steps, device=device).split(8))
    dispatch = tritonbn.backend(backend) if backend else contextlib.nullcontext()
    with dispatch:
        loss, _ = train_module.train_epoch(net, optimizer, images, labels, batches)
        accuracy = train_module.evaluate(model, images, labels, 8)  # eager: no second graph to compile
    return loss, accuracy, {key: value.cpu() for key, value in model.state_dict().items()}


def assert_same_training(got: tuple[float, float, dict], want: tuple[float, float, dict], tol: float) -> None:
    assert got[0] == pytest.approx(want[0], rel=tol, abs=tol)
    assert got[1] == want[1]
    assert got[2].keys() == want[2].keys()
    for key, value in want[2].items():
        torch.testing.assert_close(
            got[2][key], value, rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused-sigmoid"])
def test_triton_kernels_train_like_torch(fuse, device):
    """The trainer's step on tritonbn's Triton kernels (on a CPU through Triton's interpreter; with
    --fuse the sigmoid inside them) against torch.nn's BatchNorm: loss, accuracy and every weight
    and running statistic after two SGD steps, to float32 tolerance."""
    got = train_steps("tritonbn", backend="triton", fuse=fuse, device=device)
    want = train_steps("torch", device=device)
    assert_same_training(got, want, 1e-4)


@pytest.mark.slow
def test_compiled_step_trains_like_eager():
    """--compile: the same steps through torch.compile (inductor on the CPU) give eager's numbers
    to float32 tolerance (inductor fuses and reorders the arithmetic)."""
    compiled = train_steps("tritonbn", compiled=True, steps=3)
    assert_same_training(compiled, train_steps("tritonbn", steps=3), 1e-4)


def test_compile_option_is_recorded(workspace, tmp_path, monkeypatch):
    """--compile reaches compile_model with the run's device, and metrics.json records it (here
    through dynamo's eager backend: the numerics are test_compiled_step_trains_like_eager's)."""
    calls = []

    def traced_only(net, device):
        calls.append(device)
        return torch.compile(net, backend="eager")

    monkeypatch.setattr(train_module, "compile_model", traced_only)
    code, _, err = run_cli(
        "--data-dir",
        workspace["data"],
        "--limit",
        64,
        "--batch-size",
        32,
        "--quiet",
        "--epochs",
        1,
        "--compile",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    record = metrics(tmp_path)
    assert calls == [torch.device("cpu")]
    assert record["config"]["compile"] is True
    assert record["compile"] == {"enabled": True, "mode": "default"}
    assert metrics(workspace["full"])["compile"] == {"enabled": False, "mode": None}


@pytest.mark.slow
def test_distributed_run_under_torchrun_matches_one_process(workspace, tmp_path):
    """Two gloo processes, each with half of every batch and tritonbn.SyncBatchNorm: one set of
    epoch lines, and the single process's numbers up to float rounding."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"{torchrun} is not installed")
    with socket.socket() as probe:  # a free port for the rendezvous, on the loopback only
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "tritonbn.train",
            "--distributed",
            "--data-dir",
            str(workspace["data"]),
            *SHORT,
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "training on cpu" and len(lines) == 3, lines
    assert all(EPOCH_LINE.fullmatch(line) for line in lines[1:]), lines
    record = metrics(tmp_path)
    assert record["distributed"] == {"world_size": 2, "backend": "gloo"}
    # Training runs SyncBatchNorm's synchronized path on each process's half of a batch.
    first = record["dispatch"]["1"]
    assert first["input_shape"] == [16, 6, 24, 24]
    assert first["train"]["backend"] == "synchronized" and "over 2 processes" in first["train"]["reason"]
    assert first["eval"]["backend"] == "torch"
    for ours, single in zip(record["epochs"], metrics(workspace["full"])["epochs"], strict=True):
        assert ours["loss"] == pytest.approx(single["loss"], abs=1e-3)
        assert ours["train_acc"] == pytest.approx(single["train_acc"], abs=0.02)
        assert ours["test_acc"] == pytest.approx(single["test_acc"], abs=0.02)


def test_reference_batch_norm_run(workspace, tmp_path):
    code, _, err = run_cli(
        "--data-dir", workspace["data"], *SHORT, "--epochs", 2, "--bn", "reference", "--out", tmp_path
    )
    assert code == 0, err
    record = metrics(tmp_path)
    assert {plan[mode]["backend"] for plan in record["dispatch"].values() for mode in ("train", "eval")} == {
        "reference"
    }
    reference, automatic = record["epochs"][-1], metrics(workspace["full"])["epochs"][-1]
    assert abs(reference["loss"] - automatic["loss"]) < 1e-4
    assert reference["test_acc"] > 0.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resume"], "--resume needs --out"),
        (["--resume", "--out", "{empty}"], "no checkpoint at"),
        (["--out", "{full}"], "already holds a run"),
        (["--resume", "--out", "{full}", "--lr", "0.01"], "trained with --lr 0.001, got --lr 0.01"),
        (["--resume", "--out", "{full}", "--epochs", "1"], "already has 2 epochs"),
        (["--data-dir", "{empty}"], "missing train-images-idx3-ubyte"),
        (["--fuse", "--bn", "torch"], "use --bn tritonbn or reference"),
        (["--distributed"], "start the processes with torchrun"),
    ],
)
def test_errors_are_explained(workspace, tmp_path, argv, message):
    argv = [arg.format(full=workspace["full"], empty=tmp_path) for arg in argv]
    if "--data-dir" not in argv:
        argv += ["--data-dir", str(workspace["data"])]
    code, out, err = run_cli(*argv)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert "epoch" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "4"], "--batch-size 4 over 3 processes: each process needs at least 2 images"),
        (["--bn", "torch", "--device", "cpu"], "--distributed --bn torch needs CUDA"),
    ],
)
def test_distributed_runs_it_cannot_do_are_refused_before_they_start(tmp_path, monkeypatch, argv, message):
    for name, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "3"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train_module, "start_ranks", lambda *a: pytest.fail("process group started"))
    monkeypatch.setattr(train_module, "load_fashion_mnist", lambda *a, **k: pytest.fail("data loaded"))
    code, _, err = run_cli("--distributed", *argv, "--out", tmp_path / "run")
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_does_nothing(workspace, monkeypatch):
    before, record = checkpoint(workspace["full"]), metrics(workspace["full"])
    monkeypatch.setattr(train_module, "load_fashion_mnist", lambda *a, **k: pytest.fail("data loaded"))
    code, out, err = run_cli("--data-dir", workspace["data"], "--resume", "--out", workspace["full"])
    assert code == 0, err
    assert "already trained for 2 epochs, nothing to do" in err and out == ""
    assert_same_state(checkpoint(workspace["full"]), before)
    assert metrics(workspace["full"]) == record


def test_runs_started_together_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module, "_default_run_dir", lambda bn: Path("runs") / f"same-second-{bn}")
    claimed = [train_module._claim_run_dir("tritonbn") for _ in range(3)]
    assert [path.name for path in claimed] == [
        "same-second-tritonbn",
        "same-second-tritonbn-2",
        "same-second-tritonbn-3",
    ]
    assert all(path.is_dir() for path in claimed)


def test_an_interrupt_during_the_epochs_bookkeeping_waits_for_its_end():
    if not hasattr(signal, "pthread_sigmask"):
        pytest.skip("no signal masks here")
    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        pytest.skip("Ctrl-C is handled otherwise in this process")
    done = []
    with pytest.raises(KeyboardInterrupt), train_module._interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
    with train_module._interrupts_ignored():
        signal.raise_signal(signal.SIGINT)  # ignored: no KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "1e20"], "argument --batch-size: expected an integer, got '1e20'"),
        (["--batch-size", "1"], f"argument --batch-size: expected an integer from 2 to {2**63 - 1}, got 1"),
        (
            ["--batch-size", str(10**20)],
            f"argument --batch-size: expected an integer from 2 to {2**63 - 1}, got",
        ),
        (["--epochs", "0"], "argument --epochs: expected an integer from 1"),
        (["--epochs", "2.5"], "argument --epochs: expected an integer, got '2.5'"),
        (["--lr", "0"], "argument --lr: expected a finite number > 0, got 0"),
        (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--seed", str(2**64)], f"argument --seed: expected an integer from {-(2**63)} to {2**64 - 1}, got"),
        (["--bn", "cudnn"], "argument --bn: invalid choice: 'cudnn'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--out", "{file}"], "argument --out: expected a folder, got the file"),
        (["--out", "{file}/run"], "is a file, not a folder"),
        (["--out", ""], "argument --out: expected a folder, got an empty path"),
        (["--out", "{dangling}"], "a symbolic link to nothing"),
        (["--data-dir", "{file}"], "argument --data-dir: expected a folder, got the file"),
    ],
)
def test_bad_option_values_are_argparse_errors(tmp_path, monkeypatch, argv, message):
    """Exit status 2 and argparse's one-line error naming the option, before any data is loaded
    and without a run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module, "load_fashion_mnist", lambda *a, **k: pytest.fail("data loaded"))
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    argv = [arg.format(file=tmp_path / "file", dangling=tmp_path / "dangling") for arg in argv]
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()) as err:
        main(argv)
    assert info.value.code == 2
    assert message in err.getvalue() and "Traceback" not in err.getvalue()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dangling", "file"], "nothing may be created"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no one creates files")
def test_unwritable_out_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "load_fashion_mnist", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["--out", "/proc/tritonbn-run"])
    assert info.value.code == 2
    assert "argument --out: cannot write the run folder '/proc/tritonbn-run': /proc is not writable" in (
        err.getvalue()
    )


def test_largest_batch_size_trains_in_one_batch(workspace, tmp_path):
    code, out, err = run_cli(
        "--data-dir",
        workspace["data"],
        "--limit",
        64,
        "--batch-size",
        2**63 - 1,
        "--epochs",
        1,
        "--quiet",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    assert EPOCH_LINE.fullmatch(out.splitlines()[-1])


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_run_matches_the_cpu_run(workspace, tmp_path):
    """On a GPU: --compile (CUDA graphs) over tritonbn's Triton kernels learns the synthetic set
    like the CPU run (same shuffling; float32 rounding differs between the devices)."""
    code, _, err = run_cli(
        "--data-dir",
        workspace["data"],
        *SHORT,
        "--epochs",
        2,
        "--device",
        "cuda",
        "--compile",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    record = metrics(tmp_path)
    assert record["compile"] == {"enabled": True, "mode": "reduce-overhead"}
    assert record["device"]["sm_count"] > 0 and record["device"]["driver"]
    for ours, cpu in zip(record["epochs"], metrics(workspace["full"])["epochs"], strict=True):
        assert ours["loss"] == pytest.approx(cpu["loss"], abs=2e-2)
        assert ours["test_acc"] == pytest.approx(cpu["test_acc"], abs=0.05)


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_DIR} is absent)",
)
def test_learns_real_fashion_mnist(tmp_path):
    code, _, err = run_cli("--limit", 2048, "--batch-size", 64, "--epochs", 1, "--quiet", "--out", tmp_path)
    assert code == 0, err
    record = metrics(tmp_path)
    assert record["data"]["origin"] == "debian"
    # 32 Adam steps on 2,048 real images reach about 0.6 train and 0.66 test accuracy (chance: 0.1)
    assert record["epochs"][0]["train_acc"] > 0.5 and record["epochs"][0]["test_acc"] > 0.5
