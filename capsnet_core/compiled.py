"""The training step compiled (``torch.compile``; ``reduce-overhead`` captures CUDA graphs), with
a fallback to eager mode when compilation or graph capture fails, logged once.

Every model here has static shapes within a run (a fixed batch size; the last, smaller batch of
an epoch is one more graph), which is what CUDA graphs need. Compilation happens lazily at the
first call, so a failure surfaces there; the wrapper catches it, logs one warning naming the
cause, and runs the uncompiled module from then on, so a job never fails for it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


class CompiledOrEager(nn.Module):
    """Calls ``torch.compile(module, ...)``; on the first exception from it, the module itself."""

    def __init__(self, module: nn.Module, mode: str = "default", backend: Any = "inductor") -> None:
        super().__init__()
        if mode not in COMPILE_MODES or mode == "none":
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES[1:])}, not {mode!r}")
        self.module = module  # unwrap() finds the bare model here, as under DDP
        # Not registered as a submodule: the parameters belong to `module` alone.
        object.__setattr__(self, "_compiled", torch.compile(module, mode=None if mode == "default" else mode,
                                                            backend=backend))
        self.fallback_reason: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.fallback_reason is None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # compile or capture failed: eager from now on
                self.fallback_reason = _one_line(exc)
                log.warning("torch.compile failed, training uncompiled: %s", self.fallback_reason)
        return self.module(*args, **kwargs)


def _one_line(exc: BaseException) -> str:
    """``BackendCompilerFailed ← RuntimeError: CUDA graph capture failed ...``: the wrapper and its root cause."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:  # dynamo's wrapper
        root = inner
    text = (str(root).strip().splitlines() or [""])[0]
    chain = type(exc).__name__ + (f" ← {type(root).__name__}" if root is not exc else "")
    return f"{chain}: {text}"[:300]


def maybe_compile(model: nn.Module, mode: str) -> nn.Module:
    """``model`` wrapped for compiled training steps, or unchanged for mode "none"."""
    return model if mode == "none" else CompiledOrEager(model, mode)
