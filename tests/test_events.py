"""Per-job event streams against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest

from services.queue.connection import redis_client
from services.queue.events import EventLog
from services.queue.keys import Keys


@pytest.fixture
def log(redis_url):
    client = redis_client(redis_url)
    yield EventLog(client, Keys("ev:"), maxlen=50)
    client.close()


def test_publish_and_read_in_order(log):
    ids = [log.publish("j1", "progress", {"epoch": 1, "step": i, "loss": 1.0 / (i + 1)}) for i in range(5)]
    log.log("j1", "hello", level="warning")
    events = log.read("j1")
    assert [i for i, _ in events][:5] == ids
    assert [e["data"]["step"] for _, e in events[:5]] == [0, 1, 2, 3, 4]
    assert events[-1][1] == {"type": "log", "at": pytest.approx(time.time(), abs=5),
                             "data": {"level": "warning", "message": "hello"}}
    # after_id is exclusive; count limits
    assert [e["data"]["step"] for _, e in log.read("j1", after_id=ids[2], count=2)] == [3, 4]
    assert log.read("j1", after_id=log.last_id("j1")) == []
    assert log.read("nobody") == [] and log.last_id("nobody") == "0"


def test_invalid_type_and_data_rejected(log):
    with pytest.raises(ValueError, match="event type must be one of state, progress, log, result"):
        log.publish("j1", "metrics", {})
    with pytest.raises(ValueError):
        log.publish("j1", "progress", {"loss": float("nan")})


def test_stream_is_capped(log):
    pipe_ids = [log.publish("j2", "progress", {"step": i}) for i in range(1000)]
    n = log.length("j2")
    assert 50 <= n <= 50 + 100  # MAXLEN ~ trims whole stream nodes (100 entries each)
    events = log.read("j2", count=1000)
    assert events[-1][0] == pipe_ids[-1] and events[-1][1]["data"]["step"] == 999


def test_blocking_read_wakes_on_publish(log):
    start = log.last_id("j3")
    timer = threading.Timer(0.15, lambda: log.publish("j3", "log", {"message": "late"}))
    timer.start()
    t0 = time.monotonic()
    events = log.read("j3", after_id=start, block_ms=3000)
    elapsed = time.monotonic() - t0
    timer.join()
    assert [e["data"]["message"] for _, e in events] == ["late"]
    assert 0.1 <= elapsed < 2.0
    t0 = time.monotonic()
    assert log.read("j3", after_id="$", block_ms=100) == []
    assert time.monotonic() - t0 >= 0.09


def test_follow_stops_at_terminal_state_and_on_timeout(log):
    def produce():
        for step in range(3):
            time.sleep(0.03)
            log.publish("j4", "progress", {"step": step})
        log.publish("j4", "state", {"state": "succeeded"})
        log.publish("j5", "state", {"state": "running"})

    t = threading.Thread(target=produce)
    t.start()
    got = [e for _, e in log.follow("j4", block_ms=100, timeout=5)]
    t.join()
    assert [e["type"] for e in got] == ["progress", "progress", "progress", "state"]
    t0 = time.monotonic()
    assert [e["data"]["state"] for _, e in log.follow("j5", block_ms=50, timeout=0.3)] == ["running"]
    assert time.monotonic() - t0 < 2


def test_follow_continues_past_old_terminal_state(log):
    log.publish("j6", "state", {"state": "failed"})
    log.publish("j6", "state", {"state": "queued"})
    log.publish("j6", "state", {"state": "succeeded"})
    assert [e["data"]["state"] for _, e in log.follow("j6", timeout=2)] == ["failed", "queued", "succeeded"]
