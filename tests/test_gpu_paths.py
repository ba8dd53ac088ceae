"""The CUDA, bf16 and NCCL code paths, tested without a GPU.

No GPU is lent to this project, so the paths a GPU rank takes run here on stand-ins:
fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and devices are propagated, nothing is
computed, and mixing CPU and CUDA tensors raises), the ``meta`` device as the map location of
a resume, and two gloo processes for DDP. ``benchmarks/gpu_check.py`` runs the same checks on
a real GPU.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from capsnet_core import build_model
from capsnet_core.checkpoint import load_checkpoint, resume_training, save_checkpoint
from capsnet_core.evaluate import autocast_context, configure_backends, evaluate, evaluation_totals
from capsnet_core.models import MODEL_NAMES
from capsnet_core.train import ddp_options
from services.cli import main
from services.config import ray_worker_env
from services.spec.errors import SpecError
from services.spec.jobspec import parse_spec

from .conftest import REPO_ROOT

TINY_CAPSNET = {"conv_channels": 16, "primary_maps": 4, "decoder_hidden": [32, 64]}


# ----------------------------------------------------------------------------- fake CUDA


@contextmanager
def fake_cuda(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every parameter and buffer replaced by a fake tensor on cuda:0 (same shape,
    dtype, strides), inside a FakeTensorMode in which autocast on "cuda" is enabled as on a
    bf16-capable GPU."""
    mode = FakeTensorMode()
    with mode:  # moved before torch.cuda.is_available is patched: to("cuda") then stays fake
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = nn.Parameter(mode.from_tensor(param).to("cuda"),
                                                            requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = mode.from_tensor(buffer).to("cuda")
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True), mode:
        yield model


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)


# e2cnn sizes its filters from index buffers read back as Python ints: data-dependent, which fake
# tensors cannot trace. c8cnn's CUDA path is checked for real by benchmarks/gpu_check.py.
FAKE_CUDA_MODELS = [pytest.param(name, marks=pytest.mark.skip(reason="e2cnn reads buffers as sizes: not traceable"))
                    if name == "c8cnn" else name for name in MODEL_NAMES]


@pytest.mark.parametrize("name", FAKE_CUDA_MODELS)  # every registered model, new ones included
def test_every_model_runs_forward_loss_and_eval_on_fake_cuda_under_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)  # full size: fake tensors cost no compute
    with fake_cuda(model) as model:
        model.train()
        images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)  # CPU, as evaluate receives them
        labels = torch.arange(12) % 10
        x = torch.rand(4, 1, 28, 28, device="cuda")
        y = torch.randint(0, 10, (4,), device="cuda")
        device = torch.device("cuda")
        with autocast_context(device):
            assert torch.is_autocast_enabled("cuda")
            output = model(x, y)  # a CPU tensor anywhere in the model raises FakeTensorDeviceMismatchError
            loss = model.loss(output, x, y)
        for t in _tensors(tuple(output)):
            assert t.device.type == "cuda"
        assert loss.dtype == torch.float32 and loss.device.type == "cuda" and loss.dim() == 0
        if output.coupling is not None:
            assert output.coupling.dtype == torch.float32
        correct, total, loss_sum = evaluation_totals(model, images, labels, batch_size=5)
        assert {t.device.type for t in (correct, total, loss_sum)} == {"cuda"}
        assert loss_sum.dtype == torch.float32


def test_routing_logits_stay_fp32_for_bf16_predictions() -> None:
    with fake_cuda(build_model("capsnet", **TINY_CAPSNET)) as model:
        u_hat = torch.rand(model.num_primary, 3, 10, 16, device="cuda").bfloat16()
        v, coupling = model.route(u_hat)  # coupling = softmax(logits): fp32 only if logits are
        assert coupling.dtype == torch.float32 and v.dtype == torch.bfloat16
    cpu_model = build_model("capsnet", **TINY_CAPSNET)  # the same for real on the CPU
    _, coupling_bf16 = cpu_model.route(torch.randn(cpu_model.num_primary, 3, 10, 16).bfloat16())
    assert coupling_bf16.dtype == torch.float32


# ----------------------------------------------------------------------------- resume


def test_resume_on_a_gpu_rank_keeps_the_rng_state_on_the_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lenet5")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    model.loss(model(x), x, y).backward()
    optimizer.step()
    scheduler.step()
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer, scheduler, epoch=1)
    expected = torch.rand(5)  # what the run draws next, after the checkpoint
    torch.manual_seed(123)  # a fresh process would be elsewhere in the stream

    # map_location "meta" stands in for cuda:N: anything but the CPU.
    payload = load_checkpoint(path, map_location="meta")
    assert payload["rng_state"]["torch"].device.type == "cpu"
    assert all(t.device.type == "meta" for t in payload["model_state"].values())

    resumed = build_model("lenet5").to("meta")  # the rank's model on its device
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    resumed_scheduler = torch.optim.lr_scheduler.ExponentialLR(resumed_optimizer, gamma=0.5)
    state = resume_training(path, resumed, resumed_optimizer, resumed_scheduler, torch.device("meta"))
    assert state["epoch"] == 1
    assert torch.equal(torch.rand(5), expected)  # the RNG stream continues where it stopped
    assert resumed_scheduler.get_last_lr() == [5e-4]
    moments = resumed_optimizer.state[next(iter(resumed.parameters()))]["exp_avg"]
    assert moments.device.type == "meta"


# ----------------------------------------------------------------------------- DDP


def _ddp_rank(rank: int, store: str, broadcast: bool | None, results: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model("capsnet", **TINY_CAPSNET)
        with torch.no_grad():
            model._dft_inverse.add_(rank)  # a per-rank marker in a (constant) buffer
        options = ddp_options(model) if broadcast is None else {"broadcast_buffers": broadcast}
        ddp = DistributedDataParallel(model, **options)
        for _ in range(2):
            x, y = torch.rand(2, 1, 28, 28), torch.arange(2)
            model.loss(ddp(x, y), x, y).backward()
        marker = float(model._dft_inverse[0, 0] - build_model("capsnet", **TINY_CAPSNET)._dft_inverse[0, 0])
        Path(results, f"rank{rank}").write_text(f"{options['broadcast_buffers']} {marker}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes train two steps
@pytest.mark.parametrize("broadcast", [None, True], ids=["ddp_options", "control-broadcast"])
def test_ddp_with_our_options_broadcasts_no_buffers(tmp_path: Path, broadcast: bool | None) -> None:
    torch.multiprocessing.spawn(_ddp_rank, args=(str(tmp_path / "store"), broadcast, str(tmp_path)), nprocs=2)
    options, marker = (tmp_path / "rank1").read_text().split()
    if broadcast is None:  # what the services pass to prepare_model
        assert options == "False" and float(marker) == pytest.approx(1.0)  # rank 1 kept its own buffer
    else:  # the control shows the test can see a broadcast: rank 0's buffer overwrote rank 1's
        assert float(marker) == pytest.approx(0.0)


def test_ddp_options_broadcast_only_stateful_buffers() -> None:
    assert ddp_options(build_model("capsnet", **TINY_CAPSNET)) == {"broadcast_buffers": False}
    assert ddp_options(build_model("lenet5")) == {"broadcast_buffers": False}
    assert ddp_options(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))) == {"broadcast_buffers": True}


def test_ranks_wrap_their_model_with_the_models_own_ddp_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every train and tune rank prepares its model through ``prepare_ddp_model``, which hands Ray
    the model's DDP options: buffers broadcast only for a model with BatchNorm state."""
    import ray.train.torch

    from services.runs import runtime, train, tune

    seen: list[dict] = []
    monkeypatch.setattr(ray.train.torch, "prepare_model",
                        lambda model, parallel_strategy_kwargs=None: seen.append(parallel_strategy_kwargs) or model)
    runtime.prepare_ddp_model(build_model("capsnet", **TINY_CAPSNET))
    runtime.prepare_ddp_model(build_model("effcaps"))
    assert seen == [{"broadcast_buffers": False}, {"broadcast_buffers": True}]
    assert train.prepare_ddp_model is runtime.prepare_ddp_model and tune.prepare_ddp_model is runtime.prepare_ddp_model


# ----------------------------------------------------------------------------- layout, malloc, cuDNN


def test_primary_weight_layout_follows_the_device() -> None:
    model = build_model("capsnet", **TINY_CAPSNET)
    weight = model.primary.weight
    assert weight.permute(2, 3, 1, 0).is_contiguous()  # CPU: the FFT layout (kh, kw, Cin, Cout)
    model.to("meta")  # any non-CPU device: cuDNN's layout
    assert model.primary.weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_model("capsnet", **TINY_CAPSNET, channels_last=False).to("meta")
    assert plain.primary.weight.is_contiguous()


MALLOC_PROBE = """
import torch
from capsnet_core import build_model
from capsnet_core.models.fftconv import malloc_tuned
model = build_model("capsnet", conv_channels=16, primary_maps=4).to("meta")
model(torch.rand(2, 1, 28, 28, device="meta"))
print(malloc_tuned())
build_model("capsnet", conv_channels=16, primary_maps=4)(torch.rand(2, 1, 28, 28))
print(malloc_tuned())
"""


def test_malloc_policy_changes_only_when_the_fft_path_runs() -> None:
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120, check=True).stdout.split()
    assert out[0] == "None"  # a GPU rank (here: meta) never touches malloc
    assert out[1] == ("True" if sys.platform.startswith("linux") else "False")


def test_cudnn_benchmark_is_switched_on_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


# ----------------------------------------------------------------------------- evaluate


class _HostSyncs(TorchDispatchMode):
    """Counts device-to-host reads of a value (.item(), float(tensor))."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_evaluate_reads_back_once_not_once_per_batch() -> None:
    model = build_model("lenet5")
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    counts = []
    for batch_size in (40, 10):  # one batch, then four
        with _HostSyncs() as syncs:
            result = evaluate(model, images, labels, batch_size=batch_size)
        counts.append(syncs.count)
        assert result.count == 40
    assert counts[0] == counts[1]


# ----------------------------------------------------------------------------- specs and env


@pytest.mark.parametrize("spec, expected", [
    ({"kind": "train", "gpus": 3}, "batch_size: 128 does not divide over 3 ranks (--gpus 3); "
                                   "nearest valid batch sizes: 126, 129"),
    ({"kind": "train", "cpu_ranks": 5, "batch_size": 64}, "batch_size: 64 does not divide over 5 ranks "
                                                         "(--cpu-ranks 5); nearest valid batch sizes: 60, 65"),
    ({"kind": "tune", "gpus_per_trial": 3, "batch_size": 100}, "batch_size: 100 does not divide over 3 ranks "
                                                                "(--gpus-per-trial 3); nearest valid batch sizes: 99, 102"),
])
def test_gpu_counts_that_do_not_divide_the_batch_are_refused(spec: dict, expected: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert str(err.value) == expected
    valid = int(expected.rsplit(" ", 1)[1])  # the suggested size is accepted
    parse_spec({**spec, "batch_size": valid})


def test_submit_gpus_3_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("CAPSNET_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: refused first
    result = CliRunner().invoke(main, ["submit", "capsnet", "--gpus", "3"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == ["Error: --batch-size: 128 does not divide over 3 ranks (--gpus 3); "
                      "nearest valid batch sizes: 126, 129"]


def test_a_gpu_eval_reserves_its_gpu() -> None:
    assert parse_spec({"kind": "eval", "source": "j-m3x9k2a1-4f7q"}).resources() == {"gpus": 0, "cpus": 1}
    assert parse_spec({"kind": "eval", "source": "j-m3x9k2a1-4f7q", "gpus": 1}).resources() == {"gpus": 1, "cpus": 1}
    # A share of a GPU is reserved as that share; more than one GPU is never an eval's.
    assert parse_spec({"kind": "eval", "source": "j-m3x9k2a1-4f7q", "gpus": 0.25}).resources() == {"gpus": 0.25, "cpus": 1}
    with pytest.raises(SpecError, match=r"^gpus: must be 0, 1 or a fraction in \(0, 1\) \(got 2\)$"):
        parse_spec({"kind": "eval", "source": "j-m3x9k2a1-4f7q", "gpus": 2})


def test_eval_without_an_assigned_gpu_stays_on_the_cpu(tmp_path: Path, data_dir: Path) -> None:
    from services.runs.evaluate import evaluate_checkpoint

    path = save_checkpoint(tmp_path / "checkpoint.pt", build_model("lenet5"))
    # A machine with a GPU that this task was not given: before, this picked cuda.
    with mock.patch("torch.cuda.is_available", return_value=True):
        result = evaluate_checkpoint(str(path), "mnist", [0.0], test_subset=50, data_dir=str(data_dir))
    assert result["device"] == "cpu"


def test_workers_forward_nccl_variables_to_ray() -> None:
    env = {"CAPSNET_ARTIFACTS": "/a", "CAPSNET_METRICS_PORT": "9310", "NCCL_SOCKET_IFNAME": "eth0",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "HOME": "/root", "MY_NCCL_THING": "x"}
    assert ray_worker_env(env) == {"CAPSNET_ARTIFACTS": "/a", "NCCL_SOCKET_IFNAME": "eth0",
                                   "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


@pytest.mark.slow  # trains every model, resumes, runs DDP
def test_gpu_check_cpu_parts_run_and_pass() -> None:
    """benchmarks/gpu_check.py's CPU-only parts, so the GPU script cannot rot."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(any(line.split()[:1] == [name] for line in lines) for name in MODEL_NAMES), done.stdout
    assert "resume through the device path: ok" in done.stdout and "ok (gloo)" in done.stdout
