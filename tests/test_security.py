"""A job can never run code or exhaust a worker: safe checkpoint loading, bounded
eval sources, bounded model sizes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.checkpoint import CheckpointRejected, load_checkpoint, save_checkpoint
from capsnet_core.models import MODEL_NAMES, count_parameters, estimate_model_size
from services.cli import main
from services.config import DEFAULT_MAX_PARAMS
from services.spec.errors import SpecError
from services.spec.jobspec import check_model_size, parse_spec
from services.spec.sources import SourceRefused, check_source_allowed

from .conftest import REPO_ROOT


class Evil:
    """Unpickling this runs a shell command: what a hostile 'checkpoint' would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": 1, "model": {"name": "lenet5", "config": {}}, "x": Evil(marker)}, path)
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """capsctl with a private artifact folder; Redis unreachable, so a refusal must come first."""
    for key in ("CAPSNET_EVAL_ROOTS", "CAPSNET_MAX_PARAMS", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CAPSNET_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("CAPSNET_REDIS_URL", "redis://127.0.0.1:1/0")
    (tmp_path / "artifacts").mkdir()
    return tmp_path / "artifacts"


# ----------------------------------------------------------------------------- safe loading


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointRejected) as err:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"{path}: refused") and "\n" not in message


def test_junk_and_foreign_files_are_refused_with_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)  # safe to load, but not ours
    for path in (junk, foreign):
        with pytest.raises(CheckpointRejected, match=rf"^{re.escape(str(path))}: refused, not a"):
            load_checkpoint(path)


def test_every_torch_load_in_the_project_is_weights_only() -> None:
    calls = []
    for folder in ("capsnet_core", "services", "benchmarks"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if "torch.load(" in line:
                    calls.append((path.name, line.strip()))
    assert calls
    assert all("weights_only=True" in line for _, line in calls), calls


@pytest.mark.slow  # trains and resumes on MNIST
def test_our_own_checkpoints_still_load_and_resume(tmp_path: Path, data_dir: Path) -> None:
    train = load_dataset("mnist", "train", root=data_dir).subset(256)
    test = load_dataset("mnist", "test", root=data_dir).subset(100)
    config = TrainConfig(epochs=1, batch_size=64, eval_angles=(0.0,), log_every=1000)
    torch.manual_seed(0)
    first = fit(build_model("lenet5"), train, test, config, checkpoint_path=tmp_path / "c.pt")
    payload = load_checkpoint(tmp_path / "c.pt")  # optimizer, scheduler, RNG (python and torch)
    assert payload["epoch"] == 1 and payload["optimizer_state"]["state"]
    resumed = fit(build_model("lenet5"), train, test, TrainConfig(**{**config.to_dict(), "epochs": 2}),
                  resume_from=tmp_path / "c.pt")
    assert resumed.start_epoch == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    # A checkpoint written on a machine with CUDA RNG states loads as well (lists of ByteTensors).
    save_checkpoint(tmp_path / "d.pt", build_model("lenet5"))
    assert load_checkpoint(tmp_path / "d.pt")["rng_state"]["torch"].dtype == torch.uint8


# ----------------------------------------------------------------------------- eval sources


def test_eval_sources_are_bounded_to_the_allowed_roots(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    (artifacts / "j1").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    (artifacts / "link").symlink_to(other)
    inside = str(artifacts / "j1" / "checkpoint.pt")
    assert check_source_allowed(inside, str(artifacts)) == inside
    assert check_source_allowed("j-m3x9k2a1-4f7q", str(artifacts)) == "j-m3x9k2a1-4f7q"
    refused = [str(other / "c.pt"), f"{artifacts}/j1/../../other/c.pt", str(artifacts / "link" / "c.pt"),
               "/etc/passwd", "s3://bucket/c.pt"]
    for source in refused:
        with pytest.raises(SourceRefused, match="outside the allowed eval sources"):
            check_source_allowed(source, str(artifacts))
    # An operator may add roots: folders and URI prefixes.
    assert check_source_allowed(str(other / "c.pt"), str(artifacts), [str(other)])
    assert check_source_allowed("s3://bucket/runs/c.pt", str(artifacts), ["s3://bucket/runs"])
    for source in ("s3://bucket/runsx/c.pt", "s3://bucket/runs/../secret/c.pt"):
        with pytest.raises(SourceRefused):
            check_source_allowed(source, str(artifacts), ["s3://bucket/runs"])


def test_eval_submit_refuses_outside_sources_and_unsafe_files(cli_env: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(cli_env / "evil.pt", marker)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_checkpoint(outside / "checkpoint.pt", build_model("lenet5"))
    cases = [
        ([str(evil)], f"Error: source: {evil}: refused, not a safe capsnet_core checkpoint"),
        ([str(outside / "checkpoint.pt")], "is outside the allowed eval sources"),
        ([f"{cli_env}/../elsewhere/checkpoint.pt"], "is outside the allowed eval sources"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(main, ["eval", *args])
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and expected in lines[0], result.output
    assert not marker.exists()
    # Allowed by the operator: passes the checks and goes on to Redis (unreachable here: exit 1).
    monkeypatch.setenv("CAPSNET_EVAL_ROOTS", str(outside))
    allowed = CliRunner().invoke(main, ["eval", str(outside)])
    assert allowed.exit_code == 1 and "Redis" in allowed.output, allowed.output


@pytest.mark.slow
def test_a_worker_refuses_an_unsafe_checkpoint_without_retries(queue, workers, tmp_path: Path) -> None:
    # Straight into Redis (no submit-time check): the worker must refuse it, for good.
    marker = tmp_path / "pwned"
    (tmp_path / "artifacts").mkdir(exist_ok=True)
    evil = malicious_checkpoint(tmp_path / "artifacts" / "evil.pt", marker)
    outside = queue.submit({"kind": "eval", "source": "/etc/passwd", "angles": [0], "max_retries": 2})
    job = queue.submit({"kind": "eval", "source": str(evil), "angles": [0], "max_retries": 2})
    worker = workers("w-security")
    from .service_helpers import wait_until

    for job_id, expected in ((job.id, f"{evil}: refused"), (outside.id, "outside the allowed eval sources")):
        record = wait_until(lambda j=job_id: (r := queue.get(j)) and r.is_terminal and r, 180,
                            what=f"the eval to fail; log:\n{worker.output()[-3000:]}")
        assert record.state == "failed" and record.attempt == 1, (record.state, record.attempt, record.error)
        assert expected in record.error and "\n" not in record.error
    assert not marker.exists()


# ----------------------------------------------------------------------------- model sizes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_size_estimates_match_the_built_models(name: str) -> None:
    assert estimate_model_size(name)[0] == count_parameters(build_model(name))
    assert estimate_model_size(name)[0] < DEFAULT_MAX_PARAMS // 5  # the default leaves full-size models room


def test_an_oversize_model_config_is_refused_with_its_estimate(cli_env: Path) -> None:
    spec = parse_spec({"kind": "train", "model": "capsnet", "model_config": {"conv_channels": 65536}})
    with pytest.raises(SpecError, match=r"^model_config: capsnet would have ~[\d,]+ parameters \(\d+ MiB, "
                                         r"~[\d.]+ MiB of activations per sample\), above the limit of "
                                         r"100,000,000 \(CAPSNET_MAX_PARAMS\)$"):
        check_model_size(spec, DEFAULT_MAX_PARAMS)
    check_model_size(parse_spec({"kind": "train"}), DEFAULT_MAX_PARAMS)  # full size is fine
    result = CliRunner().invoke(main, ["submit", "capsnet", "--model-config", "conv_channels=65536"])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1 and "parameters" in result.output
    tune = CliRunner().invoke(main, ["tune", "--models", "lenet5", "--model-config", "hidden1=65536",
                                     "--model-config", "hidden2=65536"])
    assert tune.exit_code == 2 and "lenet5 would have ~" in tune.output, tune.output


def test_max_params_is_an_operator_setting(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_MAX_PARAMS", "1000000")
    result = CliRunner().invoke(main, ["submit", "capsnet"])  # 8.2 M parameters
    assert result.exit_code == 2 and "above the limit of 1,000,000" in result.output


def test_routing_iterations_are_capped() -> None:
    assert parse_spec({"kind": "train", "model_config": {"routing_iters": 10}})
    with pytest.raises(SpecError, match=r"^model_config.routing_iters: capsnet expects an integer in 1..10 "
                                        r"\(got 65536\)$"):
        parse_spec({"kind": "train", "model_config": {"routing_iters": 65536}})


@pytest.mark.parametrize("config", [{"width": 1}, {"width": 3, "hidden": 17}, {"rotations": 16, "width": 2}])
def test_c8cnn_estimate_is_exact_without_building_it(config: dict) -> None:
    # e2cnn cannot build on the meta device; its count comes from one field pair per layer kind
    assert estimate_model_size("c8cnn", **config)[0] == count_parameters(build_model("c8cnn", **config))
