"""The typed, versioned result document (services.spec.results): what the rank writes is what
every reader gets back, and documents stored before the type existed still read."""

from __future__ import annotations

import json

from services.spec.results import RESULT_VERSION, JobResult


def test_a_written_result_round_trips_through_json_with_its_version() -> None:
    written = JobResult.new("train", rotation_accuracy={"0": 0.98, "45": 0.61}, history=[{"epoch": 1, "lr": 1e-3}],
                            world_size=2, device="cpu", checkpoint="/runs/j/ckpt")
    stored = json.loads(json.dumps(written.to_document()))
    assert stored["version"] == RESULT_VERSION and stored["kind"] == "train"
    assert "models" not in stored  # a train document carries no tune fields
    read = JobResult.read(stored)
    assert read == written and read.rotation_accuracy == {"0": 0.98, "45": 0.61}


def test_an_unversioned_document_reads_as_version_0_and_keeps_unknown_keys() -> None:
    old = {"rotation_accuracy": {"0": 0.9}, "per_class": {"0": [0.9] * 10}, "legacy_note": "kept"}
    read = JobResult.read(old)
    assert read is not None and read.version == 0 and read.kind is None
    assert read.rotation_accuracy == {"0": 0.9} and read.to_document()["legacy_note"] == "kept"


def test_a_garbled_entry_is_dropped_not_the_whole_result() -> None:
    read = JobResult.read({"confusion": {"0": [[1, 0], [0, 1]], "35": [[1, 2], "junk"]}, "history": "nope",
                           "rotation_accuracy": {"0": 0.5}})
    assert read is not None
    assert read.confusion == {"0": [[1, 0], [0, 1]]} and read.history is None and read.rotation_accuracy == {"0": 0.5}
    assert JobResult.read("not an object") is None and JobResult.read(None) is None
