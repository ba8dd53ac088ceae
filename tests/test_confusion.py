"""The confusion matrix of an evaluation on real MNIST, and the mistakes it ranks first."""

from __future__ import annotations

from pathlib import Path

import torch

from capsnet_core import build_model, load_dataset
from capsnet_core.evaluate import evaluate, top_confusions
from capsnet_core.plots import plot_confusion_matrix


def test_confusion_matrix_agrees_with_accuracy_and_per_class(data_dir: Path, tmp_path: Path) -> None:
    test = load_dataset("mnist", "test", root=data_dir).subset(600)
    torch.manual_seed(0)
    model = build_model("lenet5")  # untrained: its mistakes are many and uneven
    result = evaluate(model, test.images, test.labels, angle=35.0)
    matrix = torch.tensor(result.confusion)
    assert matrix.shape == (10, 10) and int(matrix.sum()) == result.count == 600
    assert matrix.sum(dim=1).tolist() == torch.bincount(test.labels, minlength=10).tolist()  # rows = true class
    assert float(matrix.trace()) / 600 == result.accuracy
    assert [float(matrix[c, c] / matrix[c].sum()) for c in range(10)] == result.per_class
    worst = top_confusions(result.confusion, k=3)
    assert len(worst) == 3 and all(c.true != c.predicted for c in worst)
    assert worst[0].share == max(float(matrix[t, p] / matrix[t].sum()) for t in range(10) for p in range(10) if t != p)
    figure = plot_confusion_matrix(result.confusion, tmp_path / "confusion.png", title="lenet5 at 35°")
    assert figure.is_file() and figure.stat().st_size > 1000


def test_top_confusions_rank_by_share_of_the_true_class() -> None:
    confusion = [[0] * 10 for _ in range(10)]
    confusion[6][6], confusion[6][9] = 29, 71          # 71 % of sixes read as 9
    confusion[1][1], confusion[1][7] = 900, 100        # more images, smaller share
    confusion[3][3] = 50
    worst = top_confusions(confusion, k=5)
    assert [(c.true, c.predicted) for c in worst] == [(6, 9), (1, 7)]
    assert worst[0].describe("180") == "6→9 at 180°: 71 % of 6s (71 images)"
