"""Job specifications: what a user may ask the cluster to do, validated before it is queued.

Three kinds share one discriminated union on ``kind``::

    {"kind": "train", "model": "capsnet", "gpus": 1, "epochs": 5, "augment": "shift2+rot15"}
    {"kind": "eval", "source": "j-m3x9k2a1-4f7q", "angles": [-45, 0, 45]}
    {"kind": "tune", "models": ["capsnet", "lenet5"], "angles": [0, 15, 35], "seeds": 3}

``parse_spec`` accepts a dict or JSON text and raises ``SpecError`` (a ``ValueError``) whose
message is one line naming the field and what is allowed, e.g. ``eval_angles: duplicate angle 15``.
Unknown fields are rejected everywhere. Numbers are strict: ``"2"`` or ``true`` is not an integer.

The JSON field ``model_config`` (model config overrides such as
``{"conv_channels": 16, "primary_maps": 4}``) is the Python attribute ``model_overrides``:
pydantic reserves ``model_config`` for itself. Use ``spec.model_kwargs(name)`` to get the
overrides for one model. Serialise with ``spec.to_json()`` / ``spec.to_dict()`` (by alias).

The shared field types, limits and checks are in services.spec.types, the error messages in
services.spec.errors; their public names are importable from here too.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from capsnet_core.models.configs import MODEL_NAMES
from capsnet_core.presets import preset_for
from capsnet_core.suites import with_suite_angles
from services.spec.errors import SpecError, format_error
from services.spec.gpus import gpu_amount, gpu_count
from services.spec.types import (
    DEFAULT_ANGLES,
    DEFAULT_TUNE_MODELS,
    DEFAULT_VAL_SPLIT,
    JOB_ID_RE,
    KINDS,
    MAX_TRIALS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    AngleList,
    Bool,
    Dataset,
    ModelName,
    Priority,
    Rate,
    SuiteList,
    bounded_int,
    check_angles,
    check_batch_divides,
    check_model_config,
    check_name,
    check_preset,
    check_tags,
    check_val_split,
    kwargs_for,
)

# ----------------------------------------------------------------------------- models


class _SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              protected_namespaces=(), validate_default=False)

    kind: str
    name: str | None = None
    # Tags live in the spec (not only the job record): they are validated with the rest of it,
    # kept by retry, and a job file or the Python client sets them like any other field.
    tags: dict[str, str] = Field(default_factory=dict)
    priority: Priority = "normal"
    max_retries: bounded_int(0, 20) = 2  # type: ignore[valid-type]
    # Lease expiries (worker SIGKILLed, node gone) are the infrastructure's fault, not the job's:
    # they have this budget of their own and never use up max_retries.
    max_lost: bounded_int(0, 100) = 10  # type: ignore[valid-type]
    # Wall-clock limit of each attempt (sbatch --time; a requeued attempt gets it again, as in
    # Slurm): past it the run is stopped and the job fails, cause time_limit, with no retry.
    time_limit_s: bounded_int(1, 30 * 86400) | None = None  # type: ignore[valid-type]
    # MLflow tracking (services.runs.tracking): the server, else the worker's CAPSNET_MLFLOW_URI.
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None

    @field_validator("mlflow_uri", "mlflow_experiment")
    @classmethod
    def _v_tracking(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if not v or len(v) > 1024 or any(ord(c) < 32 for c in v):
            raise ValueError("must be 1 to 1024 printable characters")
        return v

    @field_validator("name")
    @classmethod
    def _v_name(cls, v: str | None) -> str | None:
        return check_name(v)

    @field_validator("tags")
    @classmethod
    def _v_tags(cls, v: dict[str, str]) -> dict[str, str]:
        return check_tags(v)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    def resources(self) -> dict[str, int | float]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The model label used in metrics (``capsnet``, ``capsnet+lenet5``, ``-`` for eval)."""
        return "-"


class TrainSpec(_SpecBase):
    kind: Literal["train"] = "train"
    model: ModelName = "capsnet"
    # A fraction of one GPU for a single rank; more than one: one DDP rank per whole GPU.
    gpus: gpu_count(64) = 0  # type: ignore[valid-type]
    # Records and job files written before the rename still say ``workers``: read, never written.
    cpu_ranks: bounded_int(1, 64) = Field(  # type: ignore[valid-type]
        1, validation_alias=AliasChoices("cpu_ranks", "workers"))
    epochs: bounded_int(1, 1000) = 10  # type: ignore[valid-type]
    batch_size: bounded_int(1, 65536) = 128  # type: ignore[valid-type]
    lr: Rate = 1e-3  # type: ignore[valid-type]
    lr_decay: Rate = 1.0  # type: ignore[valid-type]
    augment: str = "shift2"
    eval_angles: AngleList = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    dataset: Dataset = "mnist"
    seed: bounded_int(0, 2**32 - 1) = 0  # type: ignore[valid-type]
    model_overrides: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    train_subset: bounded_int(1, TRAIN_IMAGES) | None = None  # type: ignore[valid-type]
    test_subset: bounded_int(1, TEST_IMAGES) | None = None  # type: ignore[valid-type]
    # Training images held out (class-stratified, a fixed split seed) to measure each epoch on;
    # carved before train_subset is taken. 0: no per-epoch accuracy.
    val_split: bounded_int(0, TRAIN_IMAGES - 1) = DEFAULT_VAL_SPLIT  # type: ignore[valid-type]
    # Named test suites (capsnet_core.suites): "rotation" adds 0..180 in 15-degree steps to
    # eval_angles and reports their AUC; "affine" adds the affine-MNIST (or affNIST) accuracy.
    eval_suites: SuiteList = Field(default_factory=list)

    @field_validator("augment")
    @classmethod
    def _v_augment(cls, v: str) -> str:
        return check_preset(v)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainSpec:
        if self.gpus > 0 and self.cpu_ranks not in (1, self.gpus):
            raise ValueError(f"cpu_ranks: with gpus > 0 there is one rank per GPU; leave cpu_ranks at 1 "
                             f"(got cpu_ranks={self.cpu_ranks}, gpus={self.gpus})")
        if self.batch_size < self.ranks:
            raise ValueError(f"batch_size: must be at least the number of ranks ({self.ranks}), "
                             f"got {self.batch_size}")
        check_batch_divides(self.batch_size, self.ranks, "--gpus" if self.gpus > 0 else "--cpu-ranks")
        check_val_split(self.val_split, self.train_subset)
        object.__setattr__(self, "model_overrides", check_model_config([self.model], self.model_overrides))
        object.__setattr__(self, "eval_angles", check_angles(with_suite_angles(self.eval_angles, self.eval_suites)))
        return self

    @property
    def ranks(self) -> int:
        """Data-parallel processes: one per GPU (one for a fraction of one), else ``cpu_ranks`` CPU ranks."""
        return max(1, int(self.gpus)) if self.gpus > 0 else self.cpu_ranks

    def resources(self) -> dict[str, int | float]:
        return {"gpus": self.gpus, "cpus": self.ranks}

    def model_kwargs(self, name: str | None = None) -> dict[str, Any]:
        return kwargs_for(name or self.model, self.model_overrides)

    @property
    def label(self) -> str:
        return self.model


class EvalSpec(_SpecBase):
    kind: Literal["eval"] = "eval"
    source: str
    gpus: gpu_count(1) = 0  # type: ignore[valid-type]  # CUDA only when it holds a GPU (or a share of one)
    angles: AngleList = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    dataset: Dataset = "mnist"
    test_subset: bounded_int(1, TEST_IMAGES) | None = None  # type: ignore[valid-type]
    eval_suites: SuiteList = Field(default_factory=list)

    @model_validator(mode="after")
    def _suite_angles(self) -> EvalSpec:
        object.__setattr__(self, "angles", check_angles(with_suite_angles(self.angles, self.eval_suites)))
        return self

    @field_validator("source")
    @classmethod
    def _v_source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must be a job id (j-...) or a checkpoint path")
        if len(v) > 1024 or any(ord(c) < 32 for c in v):
            raise ValueError("must be a job id or a checkpoint path of at most 1024 printable characters")
        return v

    @property
    def source_job(self) -> str | None:
        """The job id when ``source`` names a job, else None (then it is a checkpoint path)."""
        return self.source if JOB_ID_RE.match(self.source) else None

    def resources(self) -> dict[str, int | float]:
        return {"gpus": self.gpus, "cpus": 1}


class TuneSpec(_SpecBase):
    kind: Literal["tune"] = "tune"
    models: list[ModelName] = Field(default_factory=lambda: list(DEFAULT_TUNE_MODELS))
    angles: AngleList = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    eval_angles: AngleList | None = None
    augment: list[str] | None = None
    lr: list[Rate] | None = None  # type: ignore[valid-type]
    routing_iters: list[bounded_int(1, 10)] | None = None  # type: ignore[valid-type]
    samples: bounded_int(1, 1000) = 1  # type: ignore[valid-type]
    seeds: bounded_int(1, 10) = 1  # type: ignore[valid-type]
    seed: bounded_int(0, 2**32 - 1) = 0  # type: ignore[valid-type]
    epochs: bounded_int(1, 1000) = 10  # type: ignore[valid-type]
    batch_size: bounded_int(1, 65536) = 128  # type: ignore[valid-type]
    # Fractions pack trials on one GPU (Ray's fractional GPUs); > 1: a DDP run per trial.
    gpus_per_trial: gpu_count(8) = 0  # type: ignore[valid-type]
    max_concurrent: bounded_int(1, 64) = 2  # type: ignore[valid-type]
    asha: Bool = True
    dataset: Dataset = "mnist"
    train_subset: bounded_int(1, TRAIN_IMAGES) | None = None  # type: ignore[valid-type]
    test_subset: bounded_int(1, TEST_IMAGES) | None = None  # type: ignore[valid-type]
    # Every selection (ASHA, each row's config, the best trial) is made on this hold-out of the
    # training set, never on the test set; 0 only where nothing is selected.
    val_split: bounded_int(0, TRAIN_IMAGES - 1) = DEFAULT_VAL_SPLIT  # type: ignore[valid-type]
    model_overrides: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    eval_suites: SuiteList = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _v_models(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must list at least one model ({', '.join(MODEL_NAMES)})")
        dup = next((m for i, m in enumerate(v) if m in v[:i]), None)
        if dup:
            raise ValueError(f"duplicate model {dup}")
        return v

    @field_validator("augment")
    @classmethod
    def _v_augment(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = []
        for i, preset in enumerate(v):
            try:
                out.append(check_preset(preset))
            except ValueError as err:
                raise ValueError(f"[{i}] {err}") from None
        return out

    @field_validator("lr", "routing_iters")
    @classmethod
    def _v_grid(cls, v: list[Any] | None) -> list[Any] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must list at least one value, or be left out")
        if len(v) > 16:
            raise ValueError(f"at most 16 values allowed (got {len(v)})")
        dup = next((x for i, x in enumerate(v) if x in v[:i]), None)
        if dup is not None:
            raise ValueError(f"duplicate value {dup:g}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> TuneSpec:
        if self.eval_angles is None:
            object.__setattr__(self, "eval_angles", list(self.angles))
        object.__setattr__(self, "eval_angles", check_angles(with_suite_angles(self.eval_angles or [],
                                                                                self.eval_suites)))
        if self.augment is None:
            object.__setattr__(self, "augment", [preset_for(2, abs(a)) for a in self.angles])
        elif len(self.augment) != len(self.angles):
            raise ValueError(f"augment: must list one preset per training angle ({len(self.angles)} angles, "
                             f"got {len(self.augment)} presets)")
        if self.gpus_per_trial > 1:
            check_batch_divides(self.batch_size, int(self.gpus_per_trial), "--gpus-per-trial")
        check_val_split(self.val_split, self.train_subset)
        if self.val_split == 0 and self.selects:
            raise ValueError("val_split: this search picks among lr / routing_iters / samples on the validation "
                             "split; give it at least 1 image (default 5000), 0 only for a plain grid")
        if self.routing_iters is not None and "capsnet" not in self.models:
            raise ValueError("routing_iters: only applies to capsnet, which is not in models")
        object.__setattr__(self, "model_overrides", check_model_config(list(self.models), self.model_overrides))
        n = self.num_trials()
        if n > MAX_TRIALS:
            raise ValueError(f"samples: the search has {n} trials, more than the {MAX_TRIALS} allowed; "
                             f"use fewer models, angles, lr, routing_iters, seeds or samples")
        return self

    @property
    def selects(self) -> bool:
        """Does the search pick among hyperparameters (several lr / routing_iters values, or samples)?"""
        return bool((self.lr and len(self.lr) > 1) or (self.routing_iters and len(self.routing_iters) > 1)
                    or self.samples > 1)

    def conditions(self) -> list[tuple[float, str]]:
        """(training angle, augmentation preset) pairs."""
        return list(zip(self.angles, self.augment or [], strict=True))

    def num_trials(self) -> int:
        per_model = 0
        for m in self.models:
            routing = len(self.routing_iters) if (m == "capsnet" and self.routing_iters) else 1
            per_model += len(self.angles) * len(self.lr or [None]) * routing
        return per_model * self.seeds * self.samples

    def resources(self) -> dict[str, int | float]:
        """Peak demand: ``min(max_concurrent, trials)`` trials at once, one CPU each."""
        concurrent = min(self.max_concurrent, self.num_trials())
        return {"gpus": gpu_amount(self.gpus_per_trial * concurrent), "cpus": concurrent}

    def model_kwargs(self, name: str) -> dict[str, Any]:
        return kwargs_for(name, self.model_overrides)

    @property
    def label(self) -> str:
        return "+".join(sorted(self.models))


JobSpec = Annotated[TrainSpec | EvalSpec | TuneSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)
_MODELS_BY_KIND: dict[str, type[_SpecBase]] = {"train": TrainSpec, "eval": EvalSpec, "tune": TuneSpec}



def check_model_size(spec: TrainSpec | EvalSpec | TuneSpec, max_params: int) -> None:
    """Refuse a model config a worker could not hold: the parameter count is estimated from the
    config (``estimate_model_size``: no weights are allocated) and must stay within max_params."""
    from capsnet_core.models import estimate_model_size

    if isinstance(spec, TrainSpec):
        models = [spec.model]
    elif isinstance(spec, TuneSpec):
        models = list(spec.models)
    else:
        return
    for model in models:
        params, activations = estimate_model_size(model, **spec.model_kwargs(model))
        if params > max_params:
            per_sample = f", ~{activations * 4 / 2**20:.1f} MiB of activations per sample" if activations else ""
            raise SpecError(f"model_config: {model} would have ~{params:,} parameters ({params * 4 / 2**20:.0f} MiB"
                            f"{per_sample}), above the limit of {max_params:,} (CAPSNET_MAX_PARAMS)", "model_config")


def job_spec_schema(kind: str | None = None) -> dict[str, Any]:
    """The JSON Schema (input side, so the old ``workers`` spelling is not offered) of one kind's
    spec, or of any job spec (a union on ``kind``) when ``kind`` is None."""
    if kind is None:
        return _ADAPTER.json_schema(mode="validation")
    return _MODELS_BY_KIND[kind].model_json_schema(mode="validation")


def parse_spec(data: Any) -> TrainSpec | EvalSpec | TuneSpec:
    """Validate a job spec given as a dict, JSON text or an already-built spec."""
    if isinstance(data, _SpecBase):
        return data  # type: ignore[return-value]
    if isinstance(data, bytes | bytearray):
        data = data.decode("utf-8", errors="replace")
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise SpecError(f"spec: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                            "spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec: must be a JSON object with a kind of {', '.join(KINDS)} "
                        f"(got {type(data).__name__})", "spec")
    kind = data.get("kind") if isinstance(data.get("kind"), str) else None
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        raise format_error(errors[0], kind, _MODELS_BY_KIND) from None
