"""A damaged checkpoint never loses a job.

Unit tests (fast): size/digest verification, the walk back over recorded checkpoints, Ray run
snapshots Ray could not restore, and the job record's bounded list of verified checkpoints
(the real ``checkpoint`` Lua script on a real Redis).

End to end (slow): a real worker trains a small LeNet5 job, is SIGKILLed after its second
checkpoint, the checkpoint or Ray's snapshot is damaged on disk, and a new worker finishes the
job (``max_retries 0``) from the newest intact epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from capsnet_core import build_model, save_checkpoint
from capsnet_core.checkpoint import load_checkpoint
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.runs.checkpoints import (
    KEEP_CHECKPOINTS,
    RAY_SNAPSHOT_FILE,
    CheckpointEntry,
    entry_for,
    fetch_to,
    parse_entries,
    quarantine,
    ray_snapshot_problem,
    resume_candidates,
    verify_file,
    walk_back,
)

from ..queue_helpers import train
from ..service_helpers import wait_until

CPU = {"gpus": 0, "cpus": 4}
FILE = "checkpoint.pt"


def _write_epochs(run_dir: Path, epochs: int) -> list[CheckpointEntry]:
    """Real capsnet_core checkpoints in run_dir/epoch-NNNN/checkpoint.pt, with their entries."""
    model = build_model("lenet5")
    entries = []
    for epoch in range(1, epochs + 1):
        folder = run_dir / f"epoch-{epoch:04d}"
        path = save_checkpoint(folder / FILE, model, epoch=epoch)
        entries.append(entry_for(path, epoch, str(folder)))
    return entries


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _walk(run_dir: Path, entries: list[CheckpointEntry], legacy: str | None = None):
    return walk_back(resume_candidates(entries, legacy), fetch_to(run_dir, FILE), check_loads=load_checkpoint)


def test_intact_checkpoint_verifies_and_the_newest_is_chosen(tmp_path: Path) -> None:
    entries = _write_epochs(tmp_path, 3)
    assert all(verify_file(Path(e.uri) / FILE, e) is None for e in entries)
    chosen, path, skipped = _walk(tmp_path, entries)
    assert chosen == entries[-1] and path == Path(entries[-1].uri) / FILE and skipped == []


@pytest.mark.parametrize("damage, reason", [
    (lambda p: _truncate(p), "size"),
    (lambda p: _flip_middle(p), "SHA-256"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: __import__("shutil").rmtree(p.parent), "missing"),
])
def test_damaged_newest_is_skipped_with_why_and_the_previous_one_used(tmp_path: Path, damage, reason: str) -> None:
    entries = _write_epochs(tmp_path, 3)
    newest = Path(entries[-1].uri) / FILE
    damage(newest)
    chosen, _, skipped = _walk(tmp_path, entries)
    assert chosen.epoch == 2
    assert len(skipped) == 1 and skipped[0].entry.epoch == 3 and reason in skipped[0].reason
    assert "epoch-0003" in skipped[0].file


def test_flipped_bytes_are_caught_by_the_digest_even_when_the_file_still_loads(tmp_path: Path) -> None:
    entries = _write_epochs(tmp_path, 1)
    path = Path(entries[0].uri) / FILE
    data = bytearray(path.read_bytes())
    # Flip one byte inside a weight tensor's storage: torch still loads it, with a wrong weight.
    offset = data.rindex(b"data/0") + 200 if b"data/0" in data else len(data) // 2
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    assert "SHA-256" in verify_file(path, entries[0])


def test_all_damaged_means_a_fresh_start(tmp_path: Path) -> None:
    entries = _write_epochs(tmp_path, 2)
    for e in entries:
        _truncate(Path(e.uri) / FILE)
    chosen, path, skipped = _walk(tmp_path, entries)
    assert chosen is None and path is None and [s.entry.epoch for s in skipped] == [2, 1]


def test_an_unrecorded_legacy_checkpoint_is_only_checked_by_loading(tmp_path: Path) -> None:
    entries = _write_epochs(tmp_path, 2)
    legacy = Path(entries[-1].uri)
    candidates = resume_candidates(entries[:1], str(legacy))  # the record's old plain field names epoch 2
    assert [(c.epoch, c.verifiable) for c in candidates] == [(2, False), (1, True)]
    _truncate(legacy / FILE)
    chosen, _, skipped = walk_back(candidates, fetch_to(tmp_path, FILE), check_loads=load_checkpoint)
    assert chosen.epoch == 1 and "does not load" in skipped[0].reason


def test_parse_entries_drops_junk() -> None:
    good = {"epoch": 2, "uri": "/a/epoch-0002", "size": 10, "sha256": "ab"}
    assert parse_entries(json.dumps([good, {"uri": 3}, "x", {"epoch": "1", "uri": "/b"}])) == [
        CheckpointEntry(2, "/a/epoch-0002", 10, "ab")]
    assert parse_entries("not json") == [] and parse_entries(None) == []


def _snapshot(run_dir: Path, names: list[str], ray_version: str = "2.60.0") -> Path:
    path = run_dir / RAY_SNAPSHOT_FILE
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in names]
    path.write_text(json.dumps({  # as Ray Train 2.60 writes it
        "ray_version": ray_version, "checkpoint_results": results, "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1] if results else None, "pending_training_results": [],
        "pending_validation_specs": [], "current_report_index": len(names), "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))
    return path


def test_ray_snapshot_problems(tmp_path: Path) -> None:
    _write_epochs(tmp_path, 2)
    assert ray_snapshot_problem(tmp_path, "2.60.0") is None  # no snapshot: Ray starts afresh
    path = _snapshot(tmp_path, ["epoch-0001", "epoch-0002"])
    assert ray_snapshot_problem(tmp_path, "2.60.0") is None
    _snapshot(tmp_path, ["epoch-0001", "epoch-0003"])  # a checkpoint folder deleted since
    assert "epoch-0003, which no longer exists" in ray_snapshot_problem(tmp_path, "2.60.0")
    # the attempt resumes from epoch 1 and writes epoch-0002 again: Ray would prune the new one
    _snapshot(tmp_path, ["epoch-0001", "epoch-0002"])
    assert ray_snapshot_problem(tmp_path, "2.60.0", resume_epoch=2) is None
    assert "epoch-0002, later than the epoch 1" in ray_snapshot_problem(tmp_path, "2.60.0", resume_epoch=1)
    assert "epoch-0001, later than the epoch 0" in ray_snapshot_problem(tmp_path, "2.60.0", resume_epoch=0)
    _snapshot(tmp_path, ["epoch-0001"], ray_version="2.9.0")
    assert "Ray '2.9.0'" in ray_snapshot_problem(tmp_path, "2.60.0")
    path.write_bytes(b"")
    assert "unreadable" in ray_snapshot_problem(tmp_path, "2.60.0")
    path.write_bytes(b'{"ray_version": "2.60.0", "checkpoint_res')
    assert "unreadable" in ray_snapshot_problem(tmp_path, "2.60.0")
    moved = quarantine(path, now=1.5)
    assert moved.name == f"{RAY_SNAPSHOT_FILE}.corrupt-1500" and moved.exists() and not path.exists()


def test_ray_snapshot_check_uses_rays_schema(tmp_path: Path) -> None:
    """Valid JSON that Ray's checkpoint manager would still refuse is a problem too."""
    import ray

    _write_epochs(tmp_path, 1)
    good = _snapshot(tmp_path, ["epoch-0001"], ray_version=ray.__version__)
    assert ray_snapshot_problem(tmp_path, ray.__version__) is None
    state = json.loads(good.read_text())
    del state["current_report_index"]
    good.write_text(json.dumps(state))
    assert "not what Ray Train expects" in ray_snapshot_problem(tmp_path, ray.__version__)


def test_record_keeps_the_last_k_verified_checkpoints_and_the_plain_field(client) -> None:
    q = JobQueue(client, Keys("t:"), lease_seconds=5)
    rec = q.submit(train())
    job = q.claim("w1", CPU)
    for epoch in range(1, KEEP_CHECKPOINTS + 3):
        uri = f"/artifacts/{rec.id}/epoch-{epoch:04d}"
        entry = {"epoch": epoch, "uri": uri, "size": 1000 + epoch, "sha256": f"{epoch:064x}"}
        assert q.set_checkpoint(job.id, job.token, uri, entry, keep=KEEP_CHECKPOINTS)
    assert q.set_checkpoint(job.id, job.token, uri, entry, keep=KEEP_CHECKPOINTS)  # the same one again: kept once
    stored = q.get(rec.id)
    assert stored.checkpoint == uri  # the old field still names the newest
    entries = parse_entries(stored.checkpoints)
    assert [e.epoch for e in entries] == list(range(3, KEEP_CHECKPOINTS + 3))
    assert entries[-1] == CheckpointEntry(KEEP_CHECKPOINTS + 2, uri, 1000 + KEEP_CHECKPOINTS + 2,
                                          f"{KEEP_CHECKPOINTS + 2:064x}")
    assert q.set_checkpoint(job.id, job.token, "/plain")  # without an entry: the list is untouched
    assert q.get(rec.id).checkpoints == stored.checkpoints
    assert not q.set_checkpoint(job.id, "stale", "/x", {"epoch": 9, "uri": "/x"})  # fenced


# ---------------------------------------------------------------------------- end to end

SMALL_JOB = {"kind": "train", "model": "lenet5", "cpu_ranks": 1, "batch_size": 64, "train_subset": 3000,
             "test_subset": 500, "eval_angles": [0], "lr": 2e-3, "max_retries": 0}
EPOCHS = 6  # killed after its 2nd checkpoint (a margin of 3 epochs on a loaded machine); resumes and trains to 6


def _damage(kind: str, run_dir: Path, newest: int) -> None:
    folder = run_dir / f"epoch-{newest:04d}"
    if kind == "truncated":
        (folder / FILE).write_bytes((folder / FILE).read_bytes()[:1000])
    elif kind == "flipped":
        _flip_middle(folder / FILE)
    elif kind == "missing_folder":
        __import__("shutil").rmtree(folder)
    elif kind == "empty_snapshot":
        (run_dir / RAY_SNAPSHOT_FILE).write_bytes(b"")  # as ENOSPC or a SIGKILL mid-write leaves it


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing_folder", "empty_snapshot"])
def test_damaged_checkpoint_after_sigkill_never_loses_the_job(queue: JobQueue, workers, tmp_path: Path,
                                                             kind: str) -> None:
    job = queue.submit({**SMALL_JOB, "epochs": EPOCHS})
    first = workers("w-doomed")
    wait_until(lambda: (r := queue.get(job.id)) and len(r.checkpoints) >= 2 and r.state == "running", 240,
               interval=0.05, what=f"two checkpoints; log:\n{first.output()[-3000:]}")
    first.kill()
    record = queue.get(job.id)
    assert record.state == "running", "the job ended before the kill: make its epochs longer"
    newest = max(c["epoch"] for c in record.checkpoints)
    assert newest < EPOCHS
    run_dir = tmp_path / "artifacts" / job.id
    wait_until(lambda: (run_dir / RAY_SNAPSHOT_FILE).exists(), 30, what="Ray's run snapshot")
    _damage(kind, run_dir, newest)

    second = workers("w-rescuer")
    done = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 300,
                      what=f"the job to finish; log:\n{second.output()[-3000:]}")
    assert done.state == "succeeded", (done.error, done.traceback, second.output()[-3000:])
    logs = [e["data"] for _, e in queue.events.read(job.id) if e["type"] == "log"]
    resumed = [e["resumed_from_epoch"] for e in logs if "resumed_from_epoch" in e]
    expected = newest if kind == "empty_snapshot" else newest - 1
    assert resumed == [expected], logs[-12:]
    skipped = [e for e in logs if "checkpoint_skipped" in e]
    if kind == "empty_snapshot":
        assert not skipped
        moved = [e for e in logs if "ray_snapshot" in e]
        assert len(moved) == 1 and Path(moved[0]["ray_snapshot"]).exists()
    else:
        assert len(skipped) == 1 and skipped[0]["level"] == "warning"
        assert f"epoch-{newest:04d}" in skipped[0]["checkpoint_skipped"]
    if kind in ("truncated", "flipped"):  # the damaged folder is kept for inspection, out of the way
        kept = [e["checkpoint_quarantined"] for e in logs if "checkpoint_quarantined" in e]
        assert len(kept) == 1 and Path(kept[0]).name.startswith(f"epoch-{newest:04d}.corrupt-"), logs[-12:]
        assert Path(kept[0]).is_dir()
    # Every checkpoint the record still lists is on disk as written: none was pruned by Ray
    # under the new attempt (its snapshot named epochs the attempt wrote again).
    for entry in parse_entries(done.checkpoints):
        assert verify_file(Path(entry.uri) / FILE, entry) is None, (entry, sorted(os.listdir(run_dir)))
    assert [h["epoch"] for h in done.result["history"]] == list(range(1, EPOCHS + 1))
    assert done.lease_expiries == 1 and done.attempt == 2  # the loss used max_lost, not max_retries (0)
    assert os.path.exists(run_dir / f"epoch-{EPOCHS:04d}" / FILE)
    assert torch.load(run_dir / f"epoch-{EPOCHS:04d}" / FILE, weights_only=True)["epoch"] == EPOCHS


def test_a_checkpoint_folder_removed_under_the_controller_is_an_infrastructure_loss(tmp_path: Path) -> None:
    from services.runs.runtime import JobContext
    from services.runs.train import run_state_vanished

    ctx = JobContext(job_id="j-1", lease_token="t", attempt=2, redis_url="redis://x", redis_prefix="p:",
                     artifacts=str(tmp_path), data_dir=None, resume_checkpoint=None, started_at=0.0)
    gone = FileNotFoundError(f"Path not found: (<pyarrow._fs.LocalFileSystem>, {tmp_path}/j-1/epoch-0003)")
    from ray.train.v2.api.exceptions import ControllerError  # what trainer.fit() raises for it

    why = run_state_vanished(ControllerError(gone), ctx)
    assert why is not None and why.startswith("run state vanished under the attempt"), why
    assert run_state_vanished(FileNotFoundError("/home/me/data.csv"), ctx) is None  # the job's own file
