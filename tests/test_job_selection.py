"""Names, tags, filters, job-id prefixes and bulk cancel/retry, through the CLI (click's
CliRunner) against a real redis-server (conftest's ``redis_url``). No Ray: jobs are driven
through the queue API where a state other than queued is needed."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from services.cli import main
from services.config import Settings
from services.queue.jobqueue import JobQueue
from services.queue.selection import JobFilter

from .test_cli import env  # noqa: F401 - the clean capsctl environment fixture


@pytest.fixture
def queue(env: dict[str, str]) -> JobQueue:  # noqa: F811 - test_cli's clean capsctl environment
    q = JobQueue.from_settings(Settings.from_env())
    yield q
    q.client.close()


def run(*args: str, code: int = 0, stdin: str | None = None):
    result = CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)
    assert result.exit_code == code, f"capsctl {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result


def listed(*args: str) -> list[dict]:
    return json.loads(run("list", "--json", *args).output)


def submit(*args: str) -> str:
    return run("submit", *args).output.strip()


def test_tags_are_stored_validated_and_shown(queue: JobQueue) -> None:
    job = submit("lenet5", "--name", "base", "--tag", "sweep=a", "--tag", "lr=1e-3")
    assert queue.get(job).spec["tags"] == {"sweep": "a", "lr": "1e-3"}
    assert listed()[0]["tags"] == {"sweep": "a", "lr": "1e-3"} and listed()[0]["name"] == "base"
    header, row = run("list", "--format", "id,name,tags").output.strip().splitlines()
    assert header.split() == ["ID", "NAME", "TAGS"] and row.split() == [job, "base", "lr=1e-3,sweep=a"]

    for bad, why in ((["--tag", "nokey"], "expected key=value"), (["--tag", "bad key=x"], "tag key"),
                     (["--tag", "k=a;rm"], "the value must be"),
                     ([a for i in range(21) for a in ("--tag", f"k{i}=v")], "at most 20 tags")):
        result = CliRunner().invoke(main, ["submit", "lenet5", *bad])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 2 and len(errors) == 1 and why in errors[0], result.output
    tune = run("tune", "--models", "lenet5", "--angles", "0", "--tag", "sweep=b").output.strip()
    eval_job = run("eval", job, "--tag", "sweep=b").output.strip()
    assert {j["id"] for j in listed("--tag", "sweep=b")} == {tune, eval_job}
    assert len(listed()) == 3  # the refused submissions enqueued nothing


def test_list_filters_and_format(queue: JobQueue) -> None:
    a1 = submit("lenet5", "--name", "sweep-a-1", "--tag", "sweep=a", "--tag", "lr=1")
    a2 = submit("capsnet", "--name", "sweep-a-2", "--tag", "sweep=a", "--tag", "lr=2")
    b1 = submit("lenet5", "--name", "other", "--tag", "sweep=b")
    tune = run("tune", "--models", "capsnet,lenet5", "--angles", "0").output.strip()
    run("cancel", b1)

    assert [j["id"] for j in listed("--tag", "sweep=a")] == [a2, a1]
    assert [j["id"] for j in listed("--tag", "sweep=a", "--tag", "lr=2")] == [a2]  # AND
    assert [j["id"] for j in listed("--name", "sweep-*")] == [a2, a1]
    assert [j["id"] for j in listed("--model", "lenet5")] == [tune, b1, a1]  # a tune job of several models
    assert [j["id"] for j in listed("--kind", "tune")] == [tune]
    assert [j["id"] for j in listed("--state", "cancelled")] == [b1]
    assert [j["id"] for j in listed("--state", "queued", "--model", "lenet5", "--kind", "train")] == [a1]
    assert len(listed("--since", "30m")) == 4
    # --since reads the submit time the index is scored by: move one job's back two hours
    queue.client.zadd(queue.keys.jobs, {a1: time.time() - 7200})
    assert a1 not in {j["id"] for j in listed("--since", "1h")} and a1 in {j["id"] for j in listed("--since", "1d")}
    assert "no jobs match" in run("list", "--tag", "sweep=zzz").output

    bad = CliRunner().invoke(main, ["list", "--format", "id,colour"])
    errors = [line for line in bad.output.splitlines() if line.startswith("Error")]
    assert bad.exit_code == 2 and len(errors) == 1 and "'colour'" in errors[0] and "id,name,state" in errors[0]


def test_select_reads_thousands_of_jobs_in_batches(queue: JobQueue) -> None:
    """The queue-side filter over ~3000 jobs: a few pipelined rounds, not one per job."""
    specs = [{"kind": "train", "model": "lenet5", "tags": {"batch": str(i % 3)}} for i in range(3000)]
    queue.submit_many(specs)
    started = time.perf_counter()
    found = queue.select(JobFilter(tags={"batch": "1"}))
    assert len(found) == 1000 and all(r.spec["tags"]["batch"] == "1" for r in found)
    assert time.perf_counter() - started < 5.0
    assert len(queue.select(JobFilter(tags={"batch": "2"}), limit=7)) == 7


def test_job_id_prefixes(queue: JobQueue) -> None:
    job = submit("lenet5", "--name", "prefixed")
    prefix = job[:-3]
    assert json.loads(run("status", prefix, "--json").output)["id"] == job
    assert run("logs", prefix).exit_code == 0
    eval_job = run("eval", prefix).output.strip()
    assert queue.get(eval_job).spec["source"] == job  # stored as the full id
    assert run("cancel", prefix).output.strip() == f"cancelled {job}"
    assert run("retry", prefix).output.startswith(f"requeued {job}")

    # three jobs under one prefix (no real id starts j-0q: ids start with the base-36 time): one line
    for suffix in ("aaaa", "aaab", "aaac"):
        queue.client.zadd(queue.keys.jobs, {f"j-0q{suffix}": time.time()})
        queue.client.hset(queue.keys.job(f"j-0q{suffix}"), mapping={"id": f"j-0q{suffix}", "state": "failed"})
    for args in (("status", "j-0q"), ("cancel", "j-0q"), ("retry", "j-0q"), ("results", "j-0q"),
                 ("compare", "j-0q", job), ("logs", "j-0q")):
        result = CliRunner().invoke(main, list(args))
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 2 and errors == [
            "Error: ambiguous: 3 jobs start with j-0q (j-0qaaaa, j-0qaaab, j-0qaaac)"], (args, result.output)
    missing = CliRunner().invoke(main, ["status", "j-nothing"])
    assert missing.exit_code == 1 and "no job j-nothing (see `capsctl list`)" in missing.output
    # a full id is never taken as a prefix of a longer one
    queue.client.zadd(queue.keys.jobs, {"j-0qaaaa2": time.time()})
    assert json.loads(run("status", "j-0qaaaa", "--json").output)["id"] == "j-0qaaaa"


def test_bulk_cancel_and_retry(queue: JobQueue) -> None:
    a = [submit("lenet5", "--tag", "sweep=a") for _ in range(3)]
    b = submit("lenet5", "--tag", "sweep=b")

    declined = run("cancel", "--tag", "sweep=a", "--state", "queued", stdin="n\n", code=1)
    assert "will cancel 3 job(s)" in declined.output and all(j in declined.output for j in a)
    assert {j["state"] for j in listed("--tag", "sweep=a")} == {"queued"}  # nothing touched

    accepted = run("cancel", "--tag", "sweep=a", "--state", "queued", stdin="y\n")
    assert all(f"cancelled {j}" in accepted.output for j in a)
    assert {j["state"] for j in listed("--tag", "sweep=a")} == {"cancelled"}
    assert listed("--tag", "sweep=b")[0]["state"] == "queued"

    # several ids, one in the wrong state: reported, skipped, exit 1; the others are retried
    mixed = run("retry", a[0], a[1], b, "--yes", code=1)
    assert f"requeued {a[0]}" in mixed.output and f"requeued {a[1]}" in mixed.output
    assert f"skipped {b}: job {b} is queued" in mixed.output and "1 of 3 job(s) skipped" in mixed.output
    assert [queue.get(j).state for j in a] == ["queued", "queued", "cancelled"]
    assert queue.get(a[0]).spec["tags"] == {"sweep": "a"}  # a retried job keeps its tags

    assert "give job ids or filters" in run("cancel", b, "--tag", "sweep=a", code=2).output
    assert "give the job(s) to cancel" in run("cancel", code=2).output
    assert "no jobs match" in run("retry", "--tag", "sweep=zzz", "--yes").output
