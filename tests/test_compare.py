"""`capsctl compare`: real train, eval and tune jobs (tiny LeNet5 runs on real MNIST subsets, through a
real Redis, Ray and `capsctl worker`), compared as a table, JSON, CSV and an overlay plot."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from services.cli import main
from services.queue.job import JobRecord
from services.results.compare import CompareError, runs_of

from .service_helpers import WorkerProcess, service_env

DATA = ["--train-subset", "2000", "--test-subset", "500", "--batch-size", "64"]


@pytest.fixture(scope="module")
def stack(redis_server: str, ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Redis db 4 (the per-test fixtures flush db 0) and one worker, for the whole module."""
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/4"
    redis.Redis.from_url(url).flushdb()
    tmp = tmp_path_factory.mktemp("compare")
    worker = WorkerProcess("w-compare", service_env(url, ray_cluster, tmp / "artifacts"), tmp / "worker.log")
    try:
        yield {"env": {"CAPSNET_REDIS_URL": url, "CAPSNET_STATE_DIR": str(tmp / "state"),
                       "CAPSNET_ARTIFACTS": str(tmp / "artifacts")}, "tmp": tmp, "worker": worker}
    finally:
        worker.stop()
        redis.Redis.from_url(url).flushdb()


def cli(stack: dict, *args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), env=stack["env"], catch_exceptions=False)
    assert result.exit_code == code, (result.output, stack["worker"].output()[-2000:])
    return result


@pytest.fixture(scope="module")
def jobs(stack: dict) -> dict[str, dict]:
    """Three finished jobs with different angle sets: train (0, 30), eval of it (0, 45), tune (0, 15, 30)."""
    train = cli(stack, "submit", "lenet5", "--epochs", "1", "--eval-angles", "0,30", *DATA, "--name", "upright",
                "--json").output
    train_id = json.loads(train)["id"]
    cli(stack, "logs", "-f", train_id)
    evaluated = cli(stack, "eval", train_id, "--angles", "0,45", "--test-subset", "500", "--name", "upright-45",
                    "--json").output
    eval_id = json.loads(evaluated)["id"]
    tuned = cli(stack, "tune", "--models", "lenet5", "--angles", "0,30", "--eval-angles", "0,15,30", "--seeds", "2",
                "--epochs", "1", *DATA, "--name", "rot-study", "--json").output
    tune_id = json.loads(tuned)["id"]
    for job in (eval_id, tune_id):
        cli(stack, "logs", "-f", job)
    records = {job: json.loads(cli(stack, "status", job, "--json").output) for job in (train_id, eval_id, tune_id)}
    for job, record in records.items():
        assert record["state"] == "succeeded", (job, record.get("error"))
    return {"train": records[train_id], "eval": records[eval_id], "tune": records[tune_id]}


def test_a_job_without_results_is_one_clear_error() -> None:
    record = JobRecord(id="j-abc", kind="train", state="running", priority="normal", spec={"kind": "train"})
    with pytest.raises(CompareError, match="job j-abc has no results yet \\(state running\\)"):
        runs_of(record, lambda _id: None)


@pytest.mark.slow
def test_compare_table_aligns_angles_and_shows_tune_rows_with_std(stack: dict, jobs: dict) -> None:
    from capsnet_core import build_model

    train, ev, tune = jobs["train"], jobs["eval"], jobs["tune"]
    text = cli(stack, "compare", train["id"], ev["id"], tune["id"]).output
    print(text)
    header, *rows = text.split("\n\n")[0].splitlines()
    assert header.split() == ["JOB", "NAME", "KIND", "MODEL", "AUGMENT", "PARAMS", "EPOCHS", "SEEDS",
                              "0°", "15°", "30°", "45°"]
    assert len(rows) == 4  # train, eval, and the tune job's two augmentations
    lenet_params = sum(p.numel() for p in build_model("lenet5").parameters())
    params = f"{lenet_params / 1e3:.1f} k"
    acc = train["result"]["rotation_accuracy"]
    assert rows[0].split() == [train["id"], "upright", "train", "lenet5", "shift2", *params.split(), "1", "1",
                               f"{100 * acc['0']:.1f}", f"{100 * acc['30']:.1f}"]
    # Blanks where a job has no figure: the train row has nothing under 15° and 45°.
    cols = {h: header.index(h) for h in ("0°", "15°", "30°", "45°")}
    assert rows[0][cols["15°"] - 3:cols["15°"] + 2].strip() == "" and len(rows[0]) < cols["45°"]
    # The eval job measured the same checkpoint on the same test images: the same upright figure.
    ev_acc = ev["result"]["rotation_accuracy"]
    assert ev_acc["0"] == pytest.approx(acc["0"], abs=1e-9)
    assert rows[1].split() == [ev["id"], "upright-45", "eval", "lenet5", "shift2", *params.split(), "1", "1",
                               f"{100 * ev_acc['0']:.1f}", f"{100 * ev_acc['45']:.1f}"]
    m = tune["result"]["models"]["lenet5"]
    for i, augment in enumerate(m["rows"]):
        cells = [f"{100 * m['mean'][i][j]:.1f} ± {100 * m['std'][i][j]:.1f}" for j in range(3)]
        assert rows[2 + i].split() == [tune["id"], "rot-study", "tune", "lenet5", augment, *params.split(), "1", "2",
                                       *" ".join(cells).split()]
    assert "mean ± std over seeds" in text


@pytest.mark.slow
def test_compare_json_csv_and_plot(stack: dict, jobs: dict) -> None:
    ids = [jobs[k]["id"] for k in ("train", "eval", "tune")]
    png = stack["tmp"] / "plots" / "compare.png"
    doc = json.loads(cli(stack, "compare", *ids, "--json", "--plot", str(png)).output)
    assert doc["angles"] == ["0", "15", "30", "45"] and doc["plot"] == str(png)
    assert [r["job"] for r in doc["runs"]] == [ids[0], ids[1], ids[2], ids[2]]
    train_row, eval_row, *tune_rows = doc["runs"]
    assert train_row["accuracy"]["15"] is None and train_row["accuracy"]["45"] is None
    assert train_row["accuracy"]["30"] == jobs["train"]["result"]["rotation_accuracy"]["30"]
    assert eval_row["accuracy"]["30"] is None and eval_row["epochs"] == 1 and eval_row["augment"] == "shift2"
    m = jobs["tune"]["result"]["models"]["lenet5"]
    assert [r["augment"] for r in tune_rows] == m["rows"] == ["shift2", "shift2+rot30"]
    assert [r["std"]["15"] for r in tune_rows] == [m["std"][0][1], m["std"][1][1]]
    assert all(r["seeds"] == 2 and r["parameters"] == train_row["parameters"] > 10_000 for r in tune_rows)

    rows = list(csv.DictReader(io.StringIO(cli(stack, "compare", *ids, "--csv").output)))
    assert len(rows) == 4 and rows[0]["acc_15"] == "" and rows[0]["std_0"] == ""
    assert float(rows[2]["acc_30"]) == pytest.approx(m["mean"][0][2]) and rows[2]["std_30"] != ""
    assert rows[1]["acc_45"] != "" and rows[2]["acc_45"] == ""

    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas

    bad = cli(stack, "compare", ids[0], "j-nope0000-00000000", code=1).output
    assert bad.strip().splitlines() == ["Error: no job j-nope0000-00000000 (see `capsctl list`)"]
    assert "mutually exclusive" in cli(stack, "compare", ids[0], "--json", "--csv", code=2).output


@pytest.mark.slow
def test_compare_one_class_across_runs(stack: dict, jobs: dict) -> None:
    ids = [jobs[k]["id"] for k in ("train", "eval")]
    doc = json.loads(cli(stack, "compare", *ids, "--class", "6", "--json").output)
    train_row, eval_row = doc["runs"]
    assert train_row["accuracy"]["30"] == jobs["train"]["result"]["per_class"]["30"][6]
    assert eval_row["accuracy"]["45"] == jobs["eval"]["result"]["per_class"]["45"][6]
    assert train_row["accuracy"]["30"] != jobs["train"]["result"]["rotation_accuracy"]["30"]  # not the overall one
    text = cli(stack, "compare", *ids, "--class", "6").output
    assert "class 6 only" in text
    refused = cli(stack, "compare", jobs["tune"]["id"], "--class", "6", code=1).output
    assert "is a tune job: its matrix holds no per-class figures" in refused
    assert "has no class 12" in cli(stack, "compare", ids[0], "--class", "12", code=1).output


def test_legend_names_each_runs_budget() -> None:
    """Two curves are comparable only on the same budget: the legend says each run's."""
    from services.results.compare import Run
    from services.results.plot_labels import budget_text

    budget = budget_text({"epochs": 3, "train_subset": 12000, "augment": "shift2"})
    run = Run(job="j-1", kind="train", name="demo-lenet5", model="lenet5", augment="shift2", parameters=None,
              epochs=3, seeds=1, budget=budget)
    assert run.label == "lenet5, train demo-lenet5, 3 epochs × 12,000 images, shift2"
    tuned = Run(job="j-2", kind="tune", name=None, model="capsnet", augment="shift2+rot30", parameters=None,
                epochs=2, seeds=3, rotation_auc=0.515)
    assert tuned.label == "capsnet, tune j-2, shift2+rot30, mean ± std of 3 seeds, AUC 51.5 %"
