"""What one attempt of a job reads and writes from its ranks: its record, its progress, its
checkpoints and its events, each write fenced by the attempt's lease token. A rank needs only
this, not the whole ``JobQueue``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis

from services.queue import parsing
from services.queue.errors import QueueError
from services.queue.events import EventLog
from services.queue.job import JobRecord
from services.queue.keys import Keys
from services.queue.scripts import Scripts


def dumps(obj: Any) -> str:
    """Compact JSON as every script argument is sent."""
    return json.dumps(obj, separators=(",", ":"), default=str)


def read_record(client: redis.Redis, keys: Keys, job_id: str) -> JobRecord | None:
    """The job's record, or None when there is no such job (or its key is not a hash)."""
    try:
        h = client.hgetall(keys.job(job_id))
    except redis.ResponseError as err:  # not a hash
        if not parsing.wrong_type(err):
            raise
        return None
    except UnicodeDecodeError:
        raise QueueError(f"job {job_id}: its record holds bytes that are not UTF-8") from None
    if not h:
        return None
    record = JobRecord.from_hash(h)
    record.id = record.id or job_id
    return record


class AttemptWriter:
    """The job record's reads and fenced writes that a running attempt makes."""

    def __init__(self, client: redis.Redis, keys: Keys, scripts: Scripts | None = None,
                 events: EventLog | None = None) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts if scripts is not None else Scripts(client, keys)
        self.events = events if events is not None else EventLog(client, keys, scripts=self.scripts)

    def get(self, job_id: str) -> JobRecord | None:
        return read_record(self.client, self.keys, job_id)

    def report_progress(self, job_id: str, token: str, progress: Mapping[str, Any], *,
                        publish: bool = True) -> bool:
        """Store the latest progress in the record and (``publish``) append a ``progress`` event
        (fenced). Pass ``publish=False`` when the event was already published via EventLog."""
        return bool(self.scripts.run("progress", [job_id, token, dumps(dict(progress)), "1" if publish else "0"]))

    def set_checkpoint(self, job_id: str, token: str, uri: str, entry: Mapping[str, Any] | None = None,
                       keep: int = 3) -> bool:
        """Record the URI of the newest checkpoint; the next attempt resumes from it (fenced).
        ``entry`` ({epoch, uri, size, sha256}, see ``services.runs.checkpoints``) is added to the
        record's ``checkpoints``, which keeps the last ``keep``."""
        return bool(self.scripts.run("checkpoint", [job_id, token, str(uri), dumps(dict(entry)) if entry else "",
                                                    str(keep)]))

    def add_rank_node(self, job_id: str, token: str, node_id: str) -> bool:
        """Record a Ray node the attempt's ranks run on (fenced; see ``rank_nodes``)."""
        return bool(self.scripts.run("rank_node", [job_id, token, str(node_id)]))

    def rank_nodes(self, job_id: str, token: str) -> set[str]:
        """The Ray nodes the attempt holding ``token`` recorded (empty for junk or another attempt's)."""
        try:
            raw = self.client.hget(self.keys.job(job_id), "rank_nodes")
        except redis.ResponseError as err:
            if not parsing.wrong_type(err):
                raise
            return set()
        value = parsing.json_value(raw, None) if isinstance(raw, str) else None
        if not isinstance(value, dict) or value.get("token") != token or not isinstance(value.get("nodes"), list):
            return set()
        return {n for n in value["nodes"] if isinstance(n, str) and n}
