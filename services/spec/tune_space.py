"""The search space of a tune job: every trial, in a fixed order (``expand_trials``), so every
attempt of a job names the same trials the same way. Pure: no Ray, no torch.
"""

from __future__ import annotations

import math
import random
from typing import Any

from services.spec.jobspec import TuneSpec
from services.spec.types import model_config_fields

DEFAULT_LR = 1e-3
LR_RANGE = (1e-4, 3e-3)  # log-uniform lr samples when samples > 1 and no lr grid is given


def expand_trials(spec: TuneSpec) -> list[dict[str, Any]]:
    """Every trial of the study, in a fixed order: model × condition × lr × routing × seed × sample.

    lr: the spec's grid; else, with samples > 1, one log-uniform sample per sample index
    (drawn from ``spec.seed``, shared by all models and conditions so rows compare like with
    like); else 1e-3. When lr is a grid (or there is one sample), samples repeat the grid with
    further seeds.
    """
    rng = random.Random(spec.seed)
    sampled_lr = spec.lr is None and spec.samples > 1
    lr_samples = [math.exp(rng.uniform(math.log(LR_RANGE[0]), math.log(LR_RANGE[1])))
                  for _ in range(spec.samples)] if sampled_lr else []
    trials: list[dict[str, Any]] = []
    for model in spec.models:
        base = spec.model_kwargs(model)
        default_routing = base.get("routing_iters", model_config_fields(model).get("routing_iters"))
        routing_grid: list[int | None] = (list(spec.routing_iters) if model == "capsnet" and spec.routing_iters
                                          else [default_routing if model == "capsnet" else None])
        for angle, augment in spec.conditions():
            for sample in range(spec.samples):
                lrs = [lr_samples[sample]] if sampled_lr else list(spec.lr or [DEFAULT_LR])
                for lr in lrs:
                    for routing in routing_grid:
                        for s in range(spec.seeds):
                            seed = spec.seed + s + (0 if sampled_lr else sample * spec.seeds)
                            index = len(trials)
                            r = f"-r{routing}" if routing is not None else ""
                            trials.append({
                                "index": index, "key": f"t{index:03d}-{model}-{augment}-lr{lr:.3g}{r}-s{seed}",
                                "model": model, "augment": augment, "train_angle": float(angle),
                                "lr": float(lr), "routing_iters": routing, "seed": seed, "sample": sample,
                            })
    return trials


def trial_model_kwargs(spec: TuneSpec, trial: dict[str, Any]) -> dict[str, Any]:
    """The model's constructor arguments for this trial: the spec's, with the trial's routing_iters."""
    kwargs = spec.model_kwargs(trial["model"])
    if trial["model"] == "capsnet" and trial.get("routing_iters") is not None:
        kwargs["routing_iters"] = trial["routing_iters"]
    return kwargs


def has_alternatives(spec: TuneSpec) -> bool:
    """Does the search pick among hyperparameters (so early stopping has something to drop)?"""
    return spec.selects
