"""Training on real MNIST subsets: LeNet5 and a tiny CapsNet learn; resume gives identical weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsnet_core import TrainConfig, build_model, evaluate_rotations, fit, load_dataset, load_model
from capsnet_core.checkpoint import load_checkpoint
from capsnet_core.evaluate import evaluate
from capsnet_core.plots import (
    plot_accuracy_vs_angle,
    plot_reconstructions,
    plot_robustness_heatmap,
    plot_rotated_grid,
)
from capsnet_core.train import TrainingStopped, shard_indices

TINY_CAPSNET = {"conv_channels": 32, "primary_maps": 8, "decoder_hidden": (64, 128)}


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_dataset("mnist", "train", root=data_dir).subset(5000), load_dataset("mnist", "test", root=data_dir)


@pytest.mark.slow  # trains on real MNIST
def test_lenet5_reaches_90_percent_on_the_real_test_set(mnist) -> None:
    train, test = mnist
    torch.manual_seed(0)
    model = build_model("lenet5")
    events: list[dict] = []
    result = fit(model, train, test, TrainConfig(epochs=8, batch_size=32, lr=2e-3, augment="shift2",
                                                  eval_angles=(0, 35)), on_progress=events.append)
    assert result.rotation_accuracy["0"] >= 0.90, result.rotation_accuracy
    # The tutorial's observation: a rotated test set hurts a CNN trained on upright digits.
    assert result.rotation_accuracy["35"] < result.rotation_accuracy["0"] - 0.05
    assert [h["epoch"] for h in result.history] == list(range(1, 9))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    kinds = {e["type"] for e in events}
    assert kinds == {"step", "epoch", "eval"}
    step = next(e for e in events if e["type"] == "step")
    assert step["images_per_second"] > 0 and 0 <= step["accuracy"] <= 1


@pytest.mark.slow  # trains on real MNIST
def test_tiny_capsnet_learns_well_above_chance(mnist) -> None:
    train, test = mnist
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY_CAPSNET)
    result = fit(model, train, test.subset(2000), TrainConfig(epochs=2, batch_size=64, lr=2e-3, eval_angles=(0,)))
    assert result.rotation_accuracy["0"] >= 0.80, result.rotation_accuracy


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # trains on real MNIST
def test_resume_after_epoch_k_gives_the_same_weights(mnist, tmp_path: Path) -> None:
    train, test = mnist[0].subset(1000), mnist[1].subset(200)
    config = TrainConfig(epochs=3, batch_size=50, lr=1e-3, lr_decay=0.9, augment="shift2+rot10", eval_angles=(0,))
    tiny = {"conv_channels": 8, "primary_maps": 2, "decoder_hidden": (16, 32)}

    torch.manual_seed(1)
    straight = build_model("capsnet", **tiny)
    fit(straight, train, test, config)

    torch.manual_seed(1)
    interrupted = build_model("capsnet", **tiny)
    ckpt = tmp_path / "ckpt.pt"
    fit(interrupted, train, test, TrainConfig(**{**config.to_dict(), "epochs": 2}), checkpoint_path=ckpt)
    assert load_checkpoint(ckpt)["epoch"] == 2

    torch.manual_seed(999)  # a fresh process would not share the first run's RNG either
    resumed = build_model("capsnet", **tiny)
    result = fit(resumed, train, test, config, resume_from=ckpt, checkpoint_path=ckpt)
    assert result.start_epoch == 2 and len(result.history) == 3
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_should_stop_interrupts_training(mnist) -> None:
    model = build_model("lenet5")
    with pytest.raises(TrainingStopped):
        fit(model, mnist[0], None, TrainConfig(epochs=1), should_stop=lambda: True)


def test_ranks_get_disjoint_equal_shards_of_one_permutation() -> None:
    shards = [shard_indices(1000, epoch=3, seed=0, rank=r, world_size=3) for r in range(3)]
    assert all(s.numel() == 333 for s in shards)
    union = torch.cat(shards)
    assert union.unique().numel() == 999
    assert not torch.equal(shard_indices(1000, 4, 0, 0, 3), shards[0])  # reshuffled every epoch


@pytest.mark.slow  # trains on real MNIST
def test_checkpoint_roundtrip_and_plots(mnist, tmp_path: Path) -> None:
    train, test = mnist[0].subset(500), mnist[1].subset(100)
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY_CAPSNET)
    fit(model, train, test, TrainConfig(epochs=1, batch_size=50), checkpoint_path=tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    before = evaluate(model, test.images, test.labels)
    after = evaluate(loaded, test.images, test.labels)
    assert before.accuracy == after.accuracy and len(after.per_class) == 10
    curve = evaluate_rotations(loaded, test.images, test.labels, [0, 45])
    assert set(curve) == {0.0, 45.0}
    outputs = [
        plot_accuracy_vs_angle({"capsnet": curve}, tmp_path / "curve.png", reference={"tutorial": {0: 0.99, 35: 0.92}}),
        plot_rotated_grid(loaded, test.images, test.labels, 35, tmp_path / "grid.png"),
        plot_reconstructions(loaded, test.images, tmp_path / "recon.png"),
        plot_robustness_heatmap([[0.9, 0.5], [0.88, 0.8]], ["shift2", "shift2+rot35"], ["0", "35"], tmp_path / "h.png"),
    ]
    for path in outputs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.slow
def test_rank_zero_evaluates_with_the_idle_ranks_threads(mnist) -> None:
    # Under DDP the other ranks wait while rank 0 evaluates: fit gives the evaluation the threads
    # they hold (eval_threads) and gives them back to training afterwards.
    train, test = mnist
    seen: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("lenet5")
        config = TrainConfig(epochs=1, batch_size=100, eval_angles=(0.0, 30.0), eval_threads=2, log_every=10**9)
        fit(model, train.subset(300), test.subset(200), config,
            on_progress=lambda event: seen.append(torch.get_num_threads()) if event["type"] == "eval" else None)
        assert seen == [2]  # during the rotated evaluation
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(threads)


def test_a_step_budget_ends_training_mid_epoch_and_still_evaluates(mnist) -> None:
    train, test = mnist[0].subset(640), mnist[1].subset(200)  # 10 steps of 64 per epoch
    torch.manual_seed(0)
    result = fit(build_model("lenet5"), train, test,
                 TrainConfig(epochs=5, batch_size=64, eval_angles=(0, 35), max_steps=15))
    assert [h["steps"] for h in result.history] == [10, 5]           # budget spent in the 2nd epoch
    assert sum(h["images"] for h in result.history) == 15 * 64
    assert set(result.rotation_accuracy) == {"0", "35"}               # the final evaluation still ran
    assert len(result.confusion["35"]) == 10 and sum(map(sum, result.confusion["35"])) == 200
    assert "confusion" in result.history[-1] and "confusion" not in result.history[0]
    # Without a budget the same config trains every epoch.
    unbounded = fit(build_model("lenet5"), train, None, TrainConfig(epochs=2, batch_size=64))
    assert [h["steps"] for h in unbounded.history] == [10, 10]
