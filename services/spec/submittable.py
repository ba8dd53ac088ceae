"""What only the operator's settings decide about a job spec, checked before it is queued.

The spec models check themselves; this adds the settings' rules (the model size limit, where an
eval may read a checkpoint from, and that a local checkpoint is a safe capsnet_core file). The
CLI and the Python client both call it, so a job refused by one is refused by the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.config import Settings
from services.spec.errors import SpecError
from services.spec.jobspec import EvalSpec, TrainSpec, TuneSpec, check_model_size, parse_spec
from services.spec.sources import (
    SourceRefused,
    check_checkpoint_file,
    check_source_allowed,
    local_checkpoint_file,
)


def check_submittable(spec: Any, settings: Settings) -> None:
    """Raise ``SpecError`` (one line) when the operator's settings refuse the parsed ``spec``."""
    check_model_size(spec, settings.max_params)
    if isinstance(spec, EvalSpec):
        try:
            check_source_allowed(spec.source, str(settings.artifacts), settings.eval_roots)
            local = local_checkpoint_file(spec.source)
            if local is not None:
                check_checkpoint_file(local)
        except SourceRefused as err:
            raise SpecError(str(err), "source") from None


def checked_spec(spec: Mapping[str, Any], settings: Settings) -> TrainSpec | EvalSpec | TuneSpec:
    """The parsed spec of a dict of job-spec fields, or ``SpecError`` from its model or the settings."""
    parsed = parse_spec(dict(spec))
    check_submittable(parsed, settings)
    return parsed
