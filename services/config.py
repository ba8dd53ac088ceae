"""Service settings, read once from the environment.

Every capsctl process (CLI, worker, exporter) builds one ``Settings`` with
``Settings.from_env()`` and passes it down; nothing else reads ``os.environ``.

=========================  ===========================  ====================================
field                      environment variable         default
=========================  ===========================  ====================================
redis_url                  CAPSNET_REDIS_URL            redis://127.0.0.1:6379/0
redis_prefix               CAPSNET_REDIS_PREFIX         capsnet:
ray_address                RAY_ADDRESS                  None (start/attach a local Ray)
state_dir                  CAPSNET_STATE_DIR            ~/.local/state/capsctl
artifacts                  CAPSNET_ARTIFACTS            ~/.local/share/capsctl/artifacts
metrics_port               CAPSNET_METRICS_PORT         9310
metrics_addr               CAPSNET_METRICS_ADDR         127.0.0.1 (0.0.0.0: scraped from other hosts)
lease_seconds              CAPSNET_LEASE_SECONDS        30
heartbeat_seconds          CAPSNET_HEARTBEAT_SECONDS    5
data_dir                   CAPSNET_DATA_DIR             None (capsnet_core's own default)
retention_days             CAPSNET_RETENTION_DAYS       30 (finished jobs older than this are
                                                        pruned by idle workers; 0 = keep forever)
eval_roots                 CAPSNET_EVAL_ROOTS           () (eval reads artifacts and job ids only)
max_params                 CAPSNET_MAX_PARAMS           100000000
artifacts_min_free_bytes   CAPSNET_ARTIFACTS_MIN_FREE_  268435456 (256 MiB: a worker claims
                           BYTES                        nothing while its store has less free)
require_noeviction         CAPSNET_REQUIRE_NOEVICTION   False (1 = a worker refuses to start on
                                                        an evicting Redis, see redis_health)
redis_wait                 CAPSNET_REDIS_WAIT           0 (N: submit and every outcome wait for
                                                        N replicas, WAIT; 1 with a replica)
redis_wait_timeout_ms      CAPSNET_REDIS_WAIT_TIMEOUT   1000 (ms WAIT waits for the replicas)
mlflow_uri                 CAPSNET_MLFLOW_URI           None (an MLflow tracking URI: every job
                                                        logs there, services.runs.tracking)
=========================  ===========================  ====================================

``CAPSNET_EVAL_ROOTS`` is a comma-separated list of folders or URI prefixes that ``eval`` may
read checkpoints from besides ``artifacts``; ``CAPSNET_MAX_PARAMS`` caps the parameter count of
a submitted model config (12x the full-size CapsNet by default).

``redis_url`` may be ``rediss://`` (TLS) and carry a user/password
(``redis://:secret@host:6379/0``); ``services.queue.connection.redis_client`` hands it to ``redis.Redis.from_url``.
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`` names Sentinels
instead, which give the current primary (``services.queue.connection``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from services.artifacts import normalize

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_URL_FORM = "redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]"


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "capsnet:"
DEFAULT_MAX_PARAMS = 100_000_000  # 12x the full-size CapsNet (8.2 M parameters)
# Room for a few full-size CapsNet checkpoints (model + Adam state, ~100 MB each) and Ray's files.
DEFAULT_ARTIFACTS_MIN_FREE_BYTES = 256 * 1024 * 1024

# Environment for every Ray node capsctl starts (``capsctl up``'s ``ray start``, a worker's local
# ``ray.init``). Ray renices its worker processes, and so every training rank, to 15 by default:
# then Ray's own daemons, the capsctl worker and anything else on the machine preempt the ranks,
# and one slow rank stalls every DDP step. Ranks doing the node's main work run at normal
# priority instead. A value already in the environment wins.
RAY_NODE_ENV = {"RAY_worker_niceness": "0"}


def ray_node_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``RAY_NODE_ENV`` with the environment's own values taking precedence."""
    return {key: environ.get(key, value) for key, value in RAY_NODE_ENV.items()}


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used (one-line message)."""


def _address(env: Mapping[str, str], name: str, default: str) -> str:
    """An IP address to bind to; a wrong one fails here in one line, not as a bind traceback."""
    raw = (env.get(name) or "").strip() or default
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise SettingsError(f"{name}: must be an IP address such as 127.0.0.1 or 0.0.0.0 (got {raw!r})") from None


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}: must be an integer in {lo}..{hi} (got {raw!r})") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}: must be an integer in {lo}..{hi} (got {value})")
    return value


def _path(env: Mapping[str, str], name: str, default: Path | None) -> Path | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return Path(raw.strip()).expanduser()


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    redis_prefix: str = DEFAULT_PREFIX
    ray_address: str | None = None
    artifacts: str = normalize("~/.local/share/capsctl/artifacts")  # local path or URI (services.artifacts)
    state_dir: Path = Path("~/.local/state/capsctl").expanduser()
    metrics_port: int = 9310
    metrics_addr: str = "127.0.0.1"
    lease_seconds: int = 30
    heartbeat_seconds: int = 5
    data_dir: Path | None = None
    retention_days: int = 30
    eval_roots: tuple[str, ...] = ()
    max_params: int = DEFAULT_MAX_PARAMS
    artifacts_min_free_bytes: int = DEFAULT_ARTIFACTS_MIN_FREE_BYTES
    require_noeviction: bool = False
    redis_wait: int = 0
    redis_wait_timeout_ms: int = 1000
    mlflow_uri: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default ``os.environ``); keyword overrides win (e.g. CLI flags)."""
        env = os.environ if env is None else env
        home = Path.home()
        state_dir = _path(env, "CAPSNET_STATE_DIR", home / ".local" / "state" / "capsctl")
        artifacts = normalize((env.get("CAPSNET_ARTIFACTS") or "").strip()
                              or str(home / ".local" / "share" / "capsctl" / "artifacts"))
        prefix = env.get("CAPSNET_REDIS_PREFIX", DEFAULT_PREFIX)
        if not prefix or any(c.isspace() for c in prefix):
            raise SettingsError(f"CAPSNET_REDIS_PREFIX: must be non-empty without spaces (got {prefix!r})")
        lease = _int(env, "CAPSNET_LEASE_SECONDS", 30, 2, 86400)
        heartbeat = _int(env, "CAPSNET_HEARTBEAT_SECONDS", 5, 1, 86400)
        settings = cls(
            redis_url=(env.get("CAPSNET_REDIS_URL") or DEFAULT_REDIS_URL).strip(),
            redis_prefix=prefix,
            ray_address=(env.get("RAY_ADDRESS") or "").strip() or None,
            artifacts=artifacts,
            state_dir=state_dir,  # type: ignore[arg-type]
            metrics_port=_int(env, "CAPSNET_METRICS_PORT", 9310, 0, 65535),
            metrics_addr=_address(env, "CAPSNET_METRICS_ADDR", "127.0.0.1"),
            lease_seconds=lease,
            heartbeat_seconds=heartbeat,
            data_dir=_path(env, "CAPSNET_DATA_DIR", None),
            retention_days=_int(env, "CAPSNET_RETENTION_DAYS", 30, 0, 36500),
            eval_roots=tuple(r.strip() for r in env.get("CAPSNET_EVAL_ROOTS", "").split(",") if r.strip()),
            max_params=_int(env, "CAPSNET_MAX_PARAMS", DEFAULT_MAX_PARAMS, 1, 10**12),
            artifacts_min_free_bytes=_int(env, "CAPSNET_ARTIFACTS_MIN_FREE_BYTES", DEFAULT_ARTIFACTS_MIN_FREE_BYTES,
                                          0, 2**62),
            require_noeviction=bool(_int(env, "CAPSNET_REQUIRE_NOEVICTION", 0, 0, 1)),
            redis_wait=_int(env, "CAPSNET_REDIS_WAIT", 0, 0, 16),
            redis_wait_timeout_ms=_int(env, "CAPSNET_REDIS_WAIT_TIMEOUT", 1000, 1, 600_000),
            mlflow_uri=(env.get("CAPSNET_MLFLOW_URI") or "").strip() or None,
        )
        if is_sentinel_url(settings.redis_url):
            try:
                parse_sentinel_url(settings.redis_url)
            except SentinelUrlError as err:
                raise SettingsError(f"CAPSNET_REDIS_URL: {err}") from None
        if overrides:
            settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
            settings = replace(settings, artifacts=normalize(str(settings.artifacts)))
        if settings.heartbeat_seconds >= settings.lease_seconds:
            raise SettingsError(
                f"CAPSNET_HEARTBEAT_SECONDS: must be shorter than the lease ({settings.lease_seconds} s), "
                f"got {settings.heartbeat_seconds}")
        return settings


class SentinelUrlError(ValueError):
    """A redis+sentinel:// URL that cannot be used; the message is one line."""


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[user:password@]h1:p1,h2:p2/service[/db][?sentinel_password=...]``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise SentinelUrlError(f"not a sentinel URL: {url!r}; expected {SENTINEL_URL_FORM}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    sentinels = []
    for item in filter(None, hostlist.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SentinelUrlError(f"sentinel address {item!r} is not host:port; expected {SENTINEL_URL_FORM}")
        sentinels.append((host.strip("[]"), int(port)))
    if not sentinels:
        raise SentinelUrlError(f"no sentinel addresses in the URL; expected {SENTINEL_URL_FORM}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise SentinelUrlError(f"the URL must name the monitored service (and optionally a db): {SENTINEL_URL_FORM}")
    if len(path) == 2 and not path[1].isdigit():
        raise SentinelUrlError(f"db {path[1]!r} is not a number; expected {SENTINEL_URL_FORM}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return SentinelUrl(sentinels, unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       unquote(username) or None, unquote(password) or None,
                       query.pop("sentinel_password", None), query)


# Environment variables a worker hands to its Ray processes: our own settings, and NCCL's
# (NCCL_SOCKET_IFNAME, NCCL_IB_*, TORCH_NCCL_*...), which multi-node GPU clusters need, and the
# AWS_* endpoint and credentials that Ray Train and pyarrow.fs read for an s3:// artifact store.
RAY_FORWARDED_PREFIXES = ("CAPSNET_", "NCCL_", "TORCH_NCCL_", "AWS_")  # AWS_*: S3 artifact stores


def ray_worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` that Ray workers must see (not the metrics port: one per worker)."""
    return {k: v for k, v in environ.items() if k.startswith(RAY_FORWARDED_PREFIXES) and k != "CAPSNET_METRICS_PORT"}


__all__ = ["DEFAULT_MAX_PARAMS", "DEFAULT_PREFIX", "DEFAULT_REDIS_URL", "Settings", "SettingsError", "ray_node_env", "ray_worker_env"]
