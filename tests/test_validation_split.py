"""No decision may see the test set: the validation split (a fixed, class-stratified hold-out of
the training set) drives per-epoch accuracy, ASHA, each row's configuration and the best trial.

The decisive check runs a real Ray Tune sweep twice, once on a data root whose test labels are
permuted (a real derived root with its own ``MD5SUMS``): every selection must be identical,
while the reported test figures differ."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet_core.data import ChecksumError, Dataset, load_dataset
from capsnet_core.validation import DEFAULT_VAL_SPLIT, VAL_SPLIT_SEED, split_training_pool, validation_indices
from services.queue.jobqueue import JobQueue
from services.spec.errors import SpecError
from services.spec.jobspec import parse_spec
from services.spec.types import DEFAULT_VAL_SPLIT as SPEC_DEFAULT_VAL_SPLIT

from .service_helpers import WorkerProcess, service_env, wait_until

LABELS_FILE = "t10k-labels-idx1-ubyte.gz"


def _indexed_pool(data_dir: Path) -> Dataset:
    """The real training labels, with images that spell their own index (pixels 0..2, base 256)."""
    labels = load_dataset("mnist", "train", root=data_dir).labels
    index = torch.arange(labels.shape[0])
    images = torch.zeros(labels.shape[0], 28, 28, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = index % 256, index // 256 % 256, index // 65536
    return Dataset("mnist", "train", images, labels)


def _indices(data: Dataset) -> list[int]:
    pixels = data.images[:, 0, :3].long()
    return (pixels[:, 0] + 256 * pixels[:, 1] + 65536 * pixels[:, 2]).tolist()


def test_split_is_stratified_fixed_and_never_trained_on(data_dir: Path) -> None:
    pool = _indexed_pool(data_dir)
    train, val, info = split_training_pool(pool, DEFAULT_VAL_SPLIT, train_subset=3000)
    assert val is not None and len(val) == info.size == 5000 and info.seed == VAL_SPLIT_SEED
    # Stratified: every class holds its share of the training set, within one image.
    share = torch.bincount(pool.labels).double() * 5000 / len(pool)
    assert info.class_counts == torch.bincount(val.labels).tolist()
    assert all(abs(c - s) < 1 for c, s in zip(info.class_counts, share.tolist(), strict=True))
    held = set(_indices(val))
    assert not held & set(_indices(train)) and len(train) == 3000
    # Carved before the subset: the subset is the first 3000 images the split left, and any
    # subset (or none) validates on the very same images.
    rest = [i for i in range(len(pool)) if i not in held]
    assert _indices(train) == rest[:3000]
    for subset in (None, 100):
        again_train, again_val, again_info = split_training_pool(pool, 5000, train_subset=subset)
        assert _indices(again_val) == _indices(val) and again_info == info
        assert len(again_train) == (subset or len(pool) - 5000)
    # Independent of any training seed: the one split seed decides; another seed, another split.
    assert torch.equal(validation_indices(pool.labels, 5000), validation_indices(pool.labels, 5000))
    assert not torch.equal(validation_indices(pool.labels, 5000, seed=1), validation_indices(pool.labels, 5000))
    none_train, none_val, none_info = split_training_pool(pool, 0, train_subset=10)
    assert none_val is None and none_info.size == 0 and _indices(none_train) == list(range(10))


def test_a_val_split_too_large_is_a_one_line_error(data_dir: Path) -> None:
    assert SPEC_DEFAULT_VAL_SPLIT == DEFAULT_VAL_SPLIT
    assert parse_spec({"kind": "train"}).val_split == parse_spec({"kind": "tune"}).val_split == 5000
    with pytest.raises(SpecError, match=r"^val_split: 5,000 validation images plus train_subset 58,000 exceed the "
                                        r"60,000 training images; lower --val-split or --train-subset$"):
        parse_spec({"kind": "tune", "train_subset": 58_000})
    with pytest.raises(SpecError, match=r"^val_split: must be an integer in 0\.\.59999 \(got 60000\)$"):
        parse_spec({"kind": "train", "val_split": 60_000})
    # 0 turns it off only where nothing is selected.
    assert parse_spec({"kind": "tune", "val_split": 0}).val_split == 0
    with pytest.raises(SpecError, match=r"^val_split: this search picks among lr"):
        parse_spec({"kind": "tune", "lr": [1e-3, 3e-3], "val_split": 0})
    pool = load_dataset("mnist", "train", root=data_dir)
    with pytest.raises(ValueError, match="lower --train-subset or --val-split"):
        split_training_pool(pool, 1000, train_subset=59_500)


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = (0x0801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    with gzip.open(path, "wb") as f:
        f.write(header + labels.astype(np.uint8).tobytes())


def _permuted_test_root(data_dir: Path, root: Path) -> Path:
    """A data root whose test labels are a permutation of the real ones, with its own MD5SUMS."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_dir / "MNIST" / "raw").glob("*-ubyte.gz"):
        if f.name != LABELS_FILE:
            (raw / f.name).symlink_to(f.resolve())
    labels = load_dataset("mnist", "test", root=data_dir).labels.numpy()
    _write_idx_labels(raw / LABELS_FILE, np.random.default_rng(7).permutation(labels))
    digest = hashlib.md5((raw / LABELS_FILE).read_bytes()).hexdigest()
    (raw / "MD5SUMS").write_text(f"{digest}  {LABELS_FILE}\n")
    return root


def test_a_derived_root_is_checked_against_its_own_md5sums(data_dir: Path, tmp_path: Path) -> None:
    root = _permuted_test_root(data_dir, tmp_path / "permuted")
    real, permuted = load_dataset("mnist", "test", root=data_dir), load_dataset("mnist", "test", root=root)
    assert torch.equal(real.images, permuted.images) and not torch.equal(real.labels, permuted.labels)
    assert torch.equal(torch.bincount(real.labels), torch.bincount(permuted.labels))
    # A file its MD5SUMS does not name keeps the published checksum; a changed file is refused.
    broken = tmp_path / "broken"
    shutil.copytree(root, broken, symlinks=True)
    _write_idx_labels(broken / "MNIST" / "raw" / LABELS_FILE, np.zeros(10_000))
    with pytest.raises(ChecksumError, match="MD5"):
        load_dataset("mnist", "test", root=broken)


@pytest.mark.slow
def test_fit_measures_only_the_validation_split_per_epoch(data_dir: Path, tmp_path: Path) -> None:
    from capsnet_core import TrainConfig, build_model, fit

    train, val, _ = split_training_pool(load_dataset("mnist", "train", root=data_dir), 300, train_subset=600)
    test = load_dataset("mnist", "test", root=data_dir).subset(300)
    relabelled = Dataset("mnist", "test", test.images, test.labels[torch.randperm(300, generator=torch.Generator()
                                                                                .manual_seed(3))])
    config = TrainConfig(epochs=2, batch_size=100, lr=2e-3, eval_angles=(0.0, 30.0), log_every=1000)
    runs = []
    for test_set in (test, relabelled):
        torch.manual_seed(0)
        runs.append(fit(build_model("lenet5"), train, test_set, config, val=val))
    for run in runs:
        assert all(r["val_accuracy"] is not None and "test_accuracy" not in r for r in run.history)
    keep = ("epoch", "train_loss", "train_accuracy", "val_accuracy", "val_loss")
    assert [{k: r[k] for k in keep} for r in runs[0].history] == [{k: r[k] for k in keep} for r in runs[1].history]
    assert runs[0].rotation_accuracy != runs[1].rotation_accuracy  # the test figures did see the labels


# ----------------------------------------------------------------------------- the leak test, on Ray Tune

LEAK_SWEEP = {"kind": "tune", "models": ["lenet5"], "angles": [0], "eval_angles": [0, 30], "epochs": 2,
              # One trial at a time, a good lr first: ASHA sees one order and has a weak trial to stop.
              "lr": [3e-3, 1e-4, 3e-2], "asha": True, "max_concurrent": 1,
              "train_subset": 2000, "val_split": 300, "test_subset": 300, "batch_size": 50}


def _sweep(queue: JobQueue, redis_url: str, ray_cluster: str, tmp_path: Path, name: str, data_root: Path) -> dict:
    env = service_env(redis_url, ray_cluster, tmp_path / "artifacts", CAPSNET_DATA_DIR=str(data_root))
    worker = WorkerProcess(f"w-{name}", env, tmp_path / f"w-{name}.log")
    try:
        job = queue.submit({**LEAK_SWEEP, "name": name})
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 150,
                            what=f"sweep {name}; worker log:\n{worker.output()[-3000:]}")
        assert record.state == "succeeded", (record.error, record.traceback)
        val_curves = sorted((e["data"]["trial"], e["data"]["epoch"], e["data"]["val_accuracy"])
                            for _, e in queue.events.read(job.id, count=10_000)
                            if e["type"] == "progress" and e["data"].get("type") == "trial"
                            and e["data"].get("status") == "running")
        return {**record.result, "val_curves": val_curves}
    finally:
        worker.stop()


def _decisions(result: dict) -> dict:
    m = result["models"]["lenet5"]
    return {"trials": [(t["key"], t["status"], t["epochs_trained"], t["val_accuracy"]) for t in result["trials"]],
            "selected": m["selected"], "best_trial": m["best_trial"]["trial"], "val_curves": result["val_curves"],
            "best_checkpoint": Path(m["best_checkpoint"]).parent.name, "validation": result["validation"]}


@pytest.mark.slow
def test_no_selection_changes_when_the_test_labels_are_permuted(queue: JobQueue, redis_url: str, ray_cluster: str,
                                                               data_dir: Path, tmp_path: Path) -> None:
    permuted_root = _permuted_test_root(data_dir, tmp_path / "permuted-data")
    real = _sweep(queue, redis_url, ray_cluster, tmp_path, "leak-real", data_dir)
    permuted = _sweep(queue, redis_url, ray_cluster, tmp_path, "leak-permuted", permuted_root)
    assert real["asha"] and permuted["asha"]
    assert any(t["status"] == "early_stopped" for t in real["trials"]), _decisions(real)  # ASHA did decide
    assert _decisions(real) == _decisions(permuted)
    # ... while what was reported, measured on the test set, did change.
    real_test = [t["rotation_accuracy"] for t in real["trials"]]
    permuted_test = [t["rotation_accuracy"] for t in permuted["trials"]]
    assert all(r != p for r, p in zip(real_test, permuted_test, strict=True))
    assert real["models"]["lenet5"]["mean"] != permuted["models"]["lenet5"]["mean"]
    assert max(t["rotation_accuracy"]["0"] for t in permuted["trials"]) < 0.3  # labels permuted: near chance


@pytest.mark.slow
def test_a_train_job_reports_val_accuracy_per_epoch_and_records_its_split(queue: JobQueue, workers) -> None:
    job = queue.submit({"kind": "train", "model": "lenet5", "epochs": 2, "batch_size": 100, "train_subset": 600,
                        "val_split": 200, "test_subset": 200, "eval_angles": [0, 30]})
    worker = workers("w-train-val")
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 150,
                        what=f"the train job; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "succeeded", (record.error, record.traceback)
    epochs = [e["data"] for _, e in queue.events.read(job.id, count=10_000)
              if e["type"] == "progress" and e["data"].get("type") == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 and "test_accuracy" not in e for e in epochs)
    assert all("test_accuracy" not in h and h["val_accuracy"] is not None for h in record.result["history"])
    assert record.result["validation"]["size"] == 200 and record.result["validation"]["seed"] == VAL_SPLIT_SEED
    assert set(record.result["rotation_accuracy"]) == {"0", "30"}  # the test set, measured once at the end


def test_capsctl_val_split_flag_reaches_the_spec_or_says_what_is_wrong(redis_url: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from services.cli import main

    monkeypatch.setenv("CAPSNET_REDIS_URL", redis_url)
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CAPSNET_ARTIFACTS", str(tmp_path / "artifacts"))
    ok = CliRunner().invoke(main, ["submit", "lenet5", "--train-subset", "1000", "--val-split", "800", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["spec"]["val_split"] == 800
    tune = CliRunner().invoke(main, ["tune", "--models", "lenet5", "--val-split", "300", "--json"])
    assert tune.exit_code == 0 and json.loads(tune.output)["spec"]["val_split"] == 300, tune.output
    bad = CliRunner().invoke(main, ["tune", "--models", "lenet5", "--lr", "0.001,0.003", "--val-split", "0"])
    errors = [line for line in bad.output.splitlines() if line.startswith("Error")]
    assert bad.exit_code == 2 and len(errors) == 1 and "--val-split: this search picks among lr" in errors[0], bad.output
