"""Job files (``submit|eval|tune -f FILE``), ``--dry-run`` and ``capsctl schema``, through the real
CLI against a real Redis (test_cli's fixtures); no worker runs, so what is enqueued stays queued."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from services.cli import main
from services.queue.jobqueue import JobQueue

from .conftest import REPO_ROOT
from .test_cli import env, error_lines, queue, run  # noqa: F401  (env, queue: test_cli's fixtures)

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture
def jobs(request: pytest.FixtureRequest) -> JobQueue:
    """test_cli's ``queue``: a JobQueue on this test's Redis, with capsctl's environment set to it."""
    return request.getfixturevalue("queue")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def redis_keys(jobs: JobQueue) -> list[bytes]:
    return sorted(jobs.client.keys("*"))


def test_job_file_fields_and_typed_flags_override(jobs: JobQueue, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    job = write(tmp_path, "job.yaml", "model: lenet5\nepochs: 2\ncpu_ranks: 2\nbatch_size: 64\n"
                                      "model_config: {conv1_channels: 8}\neval_angles: [0, 30]\n")
    overridden = run("submit", "-f", str(job), "--epochs", "5", "--model-config", "hidden1=32").output.strip()
    spec = jobs.get(overridden).spec
    assert (spec["model"], spec["epochs"], spec["cpu_ranks"], spec["batch_size"]) == ("lenet5", 5, 2, 64)
    assert spec["eval_angles"] == [0.0, 30.0]
    assert spec["model_config"] == {"conv1_channels": 8, "hidden1": 32}  # merged key by key
    # An option set only in the environment was not typed: the file wins (without a file it applies).
    monkeypatch.setenv("CAPSCTL_SUBMIT_EPOCHS", "7")
    from_file = run("submit", "-f", str(job)).output.strip()
    assert jobs.get(from_file).spec["epochs"] == 2
    assert jobs.get(run("submit", "lenet5").output.strip()).spec["epochs"] == 7
    # The positional MODEL typed beside the file overrides it too.
    plain = write(tmp_path, "plain.yaml", "model: lenet5\nepochs: 2\n")
    assert jobs.get(run("submit", "effcaps", "-f", str(plain)).output.strip()).spec["model"] == "effcaps"


def test_several_documents_submit_several_jobs(jobs: JobQueue, tmp_path: Path) -> None:
    many = write(tmp_path, "many.yaml", "model: lenet5\nepochs: 1\n---\nmodel: effcaps\nworkers: 2\n---\n"
                                        "kind: train\nmodel: lenet5\nseed: 3\n")
    ids = run("submit", "-f", str(many), "--name", "batch").output.split()
    assert len(ids) == 3 and len(set(ids)) == 3
    specs = [jobs.get(i).spec for i in ids]
    assert [s["model"] for s in specs] == ["lenet5", "effcaps", "lenet5"]
    assert specs[1]["cpu_ranks"] == 2 and specs[2]["seed"] == 3 and {s["name"] for s in specs} == {"batch"}
    # A JSON file may hold a list of jobs; the same key on the same file submits nothing twice.
    listed = write(tmp_path, "jobs.json", json.dumps([{"model": "lenet5"}, {"model": "capsnet", "epochs": 2}]))
    first = json.loads(run("submit", "-f", str(listed), "--json", "--idempotency-key", "k").output)
    again = json.loads(run("submit", "-f", str(listed), "--json", "--idempotency-key", "k").output)
    assert [r["id"] for r in first] == [r["id"] for r in again] and len({r["id"] for r in first}) == 2
    assert len(jobs.list()) == 5
    follow = CliRunner().invoke(main, ["submit", "-f", str(many), "--follow"])
    assert follow.exit_code == 2 and "--follow follows one job" in follow.output


@pytest.mark.parametrize(("text", "expected"), [
    ("model: lenet5\n---\nmodel: lenet5\n---\nepochs: 0\n",
     "Error: {f}, document 3: epochs: must be an integer in 1..1000 (got 0)"),
    ("model: lenet5\n---\nmodel: lenet5\nbatchsize: 64\n",
     "Error: {f}, document 2: batchsize: unknown field for a train job; allowed: "),
    ("model: vgg\n", "Error: {f}: model: must be one of "),
    ("kind: tune\nmodels: [lenet5]\n", "Error: {f}: kind: 'tune' in a file given to `capsctl submit` "
                                       "(use `capsctl tune -f`)"),
    ("- 1\n- 2\n", "Error: {f}: must be a mapping of spec fields (got list)"),
    ("model: [lenet5\n", "Error: {f}: not valid YAML ("),
    ("# nothing here\n", "Error: {f}: holds no job"),
])
def test_a_bad_document_enqueues_nothing(jobs: JobQueue, tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    result = CliRunner().invoke(main, ["submit", "-f", str(path)])
    assert result.exit_code == 2
    assert error_lines(result.output)[0].startswith(expected.format(f=path)), result.output
    assert len(error_lines(result.output)) == 1 and "Traceback" not in result.output
    assert jobs.list() == []


def test_a_bad_flag_beside_a_file_is_named_as_the_flag(jobs: JobQueue, tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", "model: lenet5\n")
    result = CliRunner().invoke(main, ["submit", "-f", str(path), "--batch-size", "0"])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"Error: {path}: --batch-size: must be an integer in 1..65536 (got 0)"]
    missing = CliRunner().invoke(main, ["submit", "-f", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml: cannot read it" in missing.output
    assert CliRunner().invoke(main, ["submit"]).exit_code == 2
    assert jobs.list() == []


def test_dry_run_prints_the_plan_and_enqueues_nothing(jobs: JobQueue, tmp_path: Path) -> None:
    before = redis_keys(jobs)
    job = write(tmp_path, "job.yaml", "model: lenet5\ncpu_ranks: 2\nbatch_size: 64\n")
    plan = yaml.safe_load(run("submit", "-f", str(job), "--dry-run", "--epochs", "3").output)
    assert plan["spec"]["epochs"] == 3 and plan["spec"]["lr"] == 0.001  # defaults filled in
    assert plan["resources"] == {"gpus": 0, "cpus": 2} and plan["ranks"] == 2
    sweep = write(tmp_path, "sweep.yaml", "models: [lenet5, capsnet]\nangles: [0, 30]\nlr: [0.001, 0.0003]\n"
                                          "seeds: 2\nmax_concurrent: 3\n")
    tune_plan = json.loads(run("tune", "-f", str(sweep), "--dry-run", "--json").output)
    assert tune_plan["trials"] == 2 * 2 * 2 * 2 and tune_plan["resources"] == {"gpus": 0, "cpus": 3}
    many = write(tmp_path, "many.yaml", "model: lenet5\n---\nmodel: capsnet\n")
    plans = list(yaml.safe_load_all(run("submit", "-f", str(many), "--dry-run").output))
    assert [p["spec"]["model"] for p in plans] == ["lenet5", "capsnet"]
    flags_only = json.loads(run("submit", "lenet5", "--dry-run", "--json").output)
    assert flags_only["spec"]["model"] == "lenet5"
    assert jobs.list() == [] and redis_keys(jobs) == before


def examples_of(kind: str) -> list[Path]:
    paths = sorted(p for p in EXAMPLES.glob("*.yaml")
                   if all(d.get("kind") == kind for d in yaml.safe_load_all(p.read_text())))
    assert paths, f"no {kind} example"
    return paths


def test_the_examples_pass_a_dry_run(jobs: JobQueue) -> None:
    commands = {"train": ["submit"], "tune": ["tune"]}
    trained = jobs.submit({"kind": "train", "model": "lenet5"}).id  # what the eval example reads
    for kind, command in commands.items():
        for path in examples_of(kind):
            out = run(*command, "-f", str(path), "--dry-run", "--json").output
            plans = json.loads(out)
            assert all(p["spec"]["kind"] == kind for p in (plans if isinstance(plans, list) else [plans]))
    for path in examples_of("eval"):
        plan = json.loads(run("eval", trained, "-f", str(path), "--dry-run", "--json").output)
        assert plan["spec"]["source"] == trained and plan["resources"] == {"gpus": 0, "cpus": 1}
    assert len(examples_of("train")) >= 3
    assert [r.id for r in jobs.list()] == [trained]  # the dry runs enqueued nothing


def test_schema_describes_what_job_files_may_say() -> None:
    train = json.loads(run("schema", "train").output)
    assert train["properties"]["cpu_ranks"]["maximum"] == 64 and "workers" not in train["properties"]
    for kind in ("train", "tune"):
        schema = json.loads(run("schema", kind).output)
        for path in examples_of(kind):
            for document in yaml.safe_load_all(path.read_text()):
                jsonschema.validate(document, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "train", "epochs": 0}, train)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "train", "batchsize": 64}, train)
    union = json.loads(run("schema").output)
    jsonschema.validate({"kind": "eval", "source": "j-abc"}, union)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "predict"}, union)
    assert CliRunner().invoke(main, ["schema", "predict"]).exit_code == 2
