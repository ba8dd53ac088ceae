"""Named test suites: the full-circle rotation AUC and the affine suite (generated affine-MNIST, or a
genuine affNIST file in its documented MATLAB layout), through the job specs and the training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.affine import AFFINE_MNIST, AFFNIST, affine_mnist, affine_test_set, load_affnist_test
from capsnet_core.data import Dataset
from capsnet_core.evaluate import evaluate_suites
from capsnet_core.suites import ROTATION_SUITE_ANGLES, SUITE_RESULTS, rotation_auc, with_suite_angles
from services.spec.errors import SpecError
from services.spec.jobspec import parse_spec


def test_rotation_auc_is_the_normalised_trapezoid_over_the_half_circle() -> None:
    assert ROTATION_SUITE_ANGLES == tuple(float(a) for a in range(0, 181, 15)) and len(ROTATION_SUITE_ANGLES) == 13
    assert rotation_auc({f"{a:g}": 1.0 for a in ROTATION_SUITE_ANGLES}) == pytest.approx(1.0)
    # Accuracy falling linearly from 1 at 0 degrees to 0 at 180: half the square.
    assert rotation_auc({a: 1 - a / 180 for a in ROTATION_SUITE_ANGLES}) == pytest.approx(0.5)
    # A dip at an extra measured angle (35) counts: it is integrated like the others.
    curve = {a: 1.0 for a in ROTATION_SUITE_ANGLES}
    assert rotation_auc({**curve, 35.0: 0.0}) == pytest.approx(1 - (5 * 1 / 2 + 10 * 1 / 2) / 180)
    # Negative angles are outside the half circle and ignored; a missing suite angle gives no AUC.
    assert rotation_auc({**curve, -45.0: 0.0}) == pytest.approx(1.0)
    assert rotation_auc({a: 1.0 for a in ROTATION_SUITE_ANGLES if a != 90}) is None


def test_specs_expand_the_rotation_suite_and_reject_unknown_suites() -> None:
    train = parse_spec({"kind": "train", "eval_angles": [0, 35], "eval_suites": ["rotation"]})
    assert train.eval_angles == with_suite_angles([0, 35], ["rotation"])
    assert set(ROTATION_SUITE_ANGLES) <= set(train.eval_angles) and 35.0 in train.eval_angles
    assert parse_spec(train.to_json()) == train  # stable through the queue's JSON
    evaluation = parse_spec({"kind": "eval", "source": "/tmp/c.pt", "eval_suites": ["affine", "rotation"]})
    assert len(evaluation.angles) == 14  # the default 0, 15, 35 plus the 11 other suite angles
    tune = parse_spec({"kind": "tune", "angles": [0, 35], "eval_suites": ["rotation"]})
    assert tune.eval_angles[:2] == [0.0, 35.0] and len(tune.eval_angles) == 14
    with pytest.raises(SpecError, match=r"^eval_suites\[0\]: must be one of 'rotation', 'affine' \(got 'circle'\)$"):
        parse_spec({"kind": "train", "eval_suites": ["circle"]})
    with pytest.raises(SpecError, match="named twice"):
        parse_spec({"kind": "tune", "eval_suites": ["affine", "affine"]})


@pytest.fixture(scope="module")
def test_set(data_dir) -> Dataset:
    return load_dataset("mnist", "test", root=data_dir).subset(600)


def test_affine_mnist_is_seeded_distorted_and_subset_stable(test_set: Dataset) -> None:
    a, b = affine_mnist(test_set, seed=0), affine_mnist(test_set.subset(100), seed=0)
    assert a.images.shape == (600, 28, 28) and a.images.dtype == torch.uint8
    assert torch.equal(a.labels, test_set.labels)
    assert torch.equal(a.images[:100], b.images)  # image i's distortion depends only on (seed, i)
    assert not torch.equal(affine_mnist(test_set, seed=1).images, a.images)
    assert AFFINE_MNIST in a.split and "affnist" not in a.split.replace(AFFINE_MNIST, "")
    diff = (a.images.float() - test_set.images.float()).abs().mean(dim=(1, 2))
    assert (diff > 5).float().mean() > 0.9  # nearly every digit is visibly moved or deformed
    # The whole digit stays on the canvas: ink is kept up to the 0.8..1.2 area scaling and shear.
    ink_ratio = a.images.float().sum(dim=(1, 2)) / test_set.images.float().sum(dim=(1, 2))
    assert ink_ratio.min() > 0.55 and ink_ratio.max() < 1.6


def _write_affnist(path: Path, digits: np.ndarray, labels: np.ndarray) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"affNISTdata": {"image": digits.reshape(len(digits), 1600).T, "label_int": labels[None, :]}})


def test_genuine_affnist_files_are_read_and_recentred(tmp_path: Path, test_set: Dataset) -> None:
    assert affine_test_set(test_set, root=tmp_path)[0] == AFFINE_MNIST  # none there: generated, named so
    canvas = np.zeros((3, 40, 40), dtype=np.uint8)
    for i, (r, c) in enumerate([(0, 0), (12, 12), (5, 11)]):  # a digit anywhere on the 40x40 canvas
        canvas[i, r:r + 28, c:c + 28] = test_set.images[i].numpy()
    _write_affnist(tmp_path / "affNIST" / "test.mat", canvas, test_set.labels[:3].numpy())
    name, genuine = affine_test_set(test_set, root=tmp_path)
    assert name == AFFNIST and genuine.images.shape == (3, 28, 28)
    assert torch.equal(genuine.labels, test_set.labels[:3])
    # Re-centred on the bounding box: all of the digit's ink is inside the 28x28 crop.
    assert torch.equal(genuine.images.float().sum(dim=(1, 2)), test_set.images[:3].float().sum(dim=(1, 2)))
    (tmp_path / "affNIST" / "test.mat").unlink()
    from scipy.io import savemat

    savemat(tmp_path / "affNIST" / "test.mat", {"something_else": np.zeros(3)})
    with pytest.raises(ValueError, match="not an affNIST file"):
        load_affnist_test(tmp_path)


@pytest.mark.slow
def test_fit_reports_the_suites(data_dir, test_set: Dataset) -> None:
    train = load_dataset("mnist", "train", root=data_dir).subset(600)
    torch.manual_seed(0)
    model = build_model("lenet5")
    config = TrainConfig(epochs=1, batch_size=50, lr=3e-3, eval_angles=ROTATION_SUITE_ANGLES,
                         eval_suites=("rotation", "affine"))
    result = fit(model, train, test_set, config)
    suites = result.suite_accuracy
    assert set(suites) == {"rotation_auc", AFFINE_MNIST}
    assert {"rotation_auc", AFFINE_MNIST, AFFNIST} == set(SUITE_RESULTS)  # the metrics' bounded suite labels
    assert suites["rotation_auc"] == pytest.approx(rotation_auc(result.rotation_accuracy))
    assert 0 < suites["rotation_auc"] < result.rotation_accuracy["0"]  # upside-down digits are harder
    assert 0.1 <= suites[AFFINE_MNIST] <= 1
    assert result.history[-1]["suite_accuracy"] == suites
    assert evaluate_suites(model, test_set, ["affine"], {})[AFFINE_MNIST] == suites[AFFINE_MNIST]
