"""The record of what ``capsctl up`` started (services.stack.stack): ``<state_dir>/stack.json``, the
``env`` file other tools source, and the lock that keeps one ``up``/``down`` at a time per
state dir. Files are replaced atomically, so a crash never leaves half a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.config import Settings

STACK_FILE = "stack.json"
ENV_FILE = "env"
ENV_KEYS = ("CAPSNET_REDIS_URL", "CAPSNET_REDIS_PREFIX", "RAY_ADDRESS", "RAY_AUTH_MODE")


def stack_path(state_dir: Path) -> Path:
    return Path(state_dir) / STACK_FILE


def env_path(state_dir: Path) -> Path:
    return Path(state_dir) / ENV_FILE


def read_stack(state_dir: Path) -> dict[str, Any] | None:
    """The record ``up`` wrote, or None (no stack, or an unreadable file)."""
    try:
        data = json.loads(stack_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_env(state_dir: Path) -> dict[str, str]:
    """``KEY=value`` pairs from ``<state_dir>/env`` (empty when there is none)."""
    try:
        text = env_path(state_dir).read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key in ENV_KEYS:
            out[key] = value
    return out


def user_settings(overrides: dict[str, Any] | None = None, state_dir: Path | None = None) -> Settings:
    """The settings a user's process runs with (``capsctl``, the Python client): the stack's
    ``<state_dir>/env`` under the real environment (which wins), under explicit ``overrides``.
    ``SettingsError`` when a value is malformed."""
    base = Settings.from_env(**({"state_dir": state_dir} if state_dir else {}))
    env = {**load_env(base.state_dir), **os.environ}  # the real environment wins over the stack's file
    given = dict(overrides or {})
    if state_dir:
        given["state_dir"] = state_dir
    return Settings.from_env(env, **given)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_record(state_dir: Path, record: dict[str, Any]) -> None:
    atomic_write(stack_path(state_dir), json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_env(state_dir: Path, env: dict[str, str]) -> None:
    lines = ["# written by `capsctl up`, removed by `capsctl down`; capsctl reads it for settings",
             "# the environment leaves unset. Other tools: set -a; . " + str(env_path(state_dir))]
    lines += [f"{k}={v}" for k, v in env.items() if v]
    atomic_write(env_path(state_dir), "\n".join(lines) + "\n")


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per state dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "stack.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["ENV_FILE", "ENV_KEYS", "STACK_FILE", "atomic_write", "env_path", "load_env", "read_stack",
           "save_record", "stack_path", "state_lock", "write_env"]
