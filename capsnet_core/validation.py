"""The validation split: a fixed, class-stratified hold-out carved from the *training* set.

Every decision a run takes (per-epoch ``val_accuracy``, early stopping, which configuration a
tune row shows, the best trial) is made on this split; the test set is only measured for the
reported figures, after training. The split depends only on the training labels, its size and
``VAL_SPLIT_SEED`` (never on the training seed), so it is the same for every model, seed and
attempt of a job, and for every job that asks for the same size.

With a training subset, the validation images are carved from the whole training pool first and
the subset is then taken from what is left, so ``train_subset`` never changes which images
validate, and no validation image is ever trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Dataset

DEFAULT_VAL_SPLIT = 5_000  # of MNIST's 60,000 training images
VAL_SPLIT_SEED = 20_171_026  # fixed: independent of every training seed (NeurIPS 2017, dynamic routing)


@dataclass(frozen=True)
class ValidationSplit:
    """What a result records about its validation split."""

    size: int
    seed: int
    class_counts: list[int]

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "seed": self.seed, "class_counts": list(self.class_counts)}


def _per_class_counts(class_sizes: torch.Tensor, size: int) -> torch.Tensor:
    """Proportional allocation of `size` over the classes (largest remainder, ties to the lower class)."""
    total = int(class_sizes.sum())
    exact = class_sizes.double() * size / total
    counts = exact.floor().long()
    remainder = size - int(counts.sum())
    if remainder:
        order = sorted(range(len(class_sizes)), key=lambda c: (-(exact[c] - counts[c]).item(), c))
        for c in order[:remainder]:
            counts[c] += 1
    return torch.minimum(counts, class_sizes)


def validation_indices(labels: torch.Tensor, size: int, seed: int = VAL_SPLIT_SEED) -> torch.Tensor:
    """Sorted indices of a class-stratified hold-out of `size` examples (empty when size is 0)."""
    n = labels.shape[0]
    if size < 0 or size >= n:
        raise ValueError(f"val_split: {size} validation images leave none of the {n:,} training images to train on; "
                         f"choose 0..{n - 1}")
    if size == 0:
        return torch.zeros(0, dtype=torch.long)
    labels = labels.cpu()
    classes = int(labels.max()) + 1
    counts = _per_class_counts(torch.bincount(labels, minlength=classes), size)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(classes):
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:int(counts[c])]])
    return torch.cat(chosen).sort().values


def split_training_pool(train: Dataset, val_size: int, train_subset: int | None = None,
                        seed: int = VAL_SPLIT_SEED) -> tuple[Dataset, Dataset | None, ValidationSplit]:
    """(training data, validation data or None, what to record): the validation split is carved
    from the whole training pool, then the first `train_subset` of the remaining images train."""
    held = validation_indices(train.labels, val_size, seed)
    if train_subset is not None and train_subset + val_size > len(train):
        raise ValueError(f"train_subset: {train_subset:,} training images plus the {val_size:,} of val_split exceed "
                         f"the {len(train):,} training images; lower --train-subset or --val-split")
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[held] = False
    rest = Dataset(train.name, train.split, train.images[keep], train.labels[keep]).subset(train_subset)
    classes = len(train.classes)
    info = ValidationSplit(size=int(held.numel()), seed=seed,
                           class_counts=torch.bincount(train.labels[held], minlength=classes).tolist())
    if not held.numel():
        return rest, None, info
    return rest, Dataset(train.name, "val", train.images[held], train.labels[held]), info


def describe_split(train: Dataset, val_size: int, seed: int = VAL_SPLIT_SEED) -> ValidationSplit:
    """What `split_training_pool` holds out of `train`, without copying any image."""
    held = validation_indices(train.labels, val_size, seed)
    return ValidationSplit(size=int(held.numel()), seed=seed,
                           class_counts=torch.bincount(train.labels[held], minlength=len(train.classes)).tolist())
