"""benchmarks/bench_zoo.py (the leaderboard) run in-process on a tiny budget of real MNIST, so the
benchmark cannot rot between its GPU runs: what zoo.json holds, the table, the plot, resuming an
interrupted run, and refusing to mix budgets in one results folder."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from capsnet_core.suites import ROTATION_SUITE_ANGLES

from .conftest import REPO_ROOT

# ~40 s on the shared 2-core machine: importing torch's compiler for Adam, and 2 x 14 evaluations.
pytestmark = pytest.mark.slow

ARGS = ["--models", "lenet5", "--augment", "shift2", "--seeds", "0,1", "--epochs", "1",
        "--train-subset", "300", "--test-subset", "200"]


def bench_zoo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_zoo", REPO_ROOT / "benchmarks" / "bench_zoo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_zoo_runs_resumes_and_refuses_another_budget(data_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    zoo = bench_zoo()
    out = tmp_path / "zoo"
    args = [*ARGS, "--data-dir", str(data_dir), "--out", str(out)]
    assert zoo.main(args) == 0
    printed = capsys.readouterr().out
    store = out / "zoo.json"
    saved = json.loads(store.read_text())
    assert "1 epoch(s) over 300 MNIST training images" in saved["budget"] and "200 test images" in saved["budget"]
    assert set(saved["runs"]) == {"lenet5|shift2|0", "lenet5|shift2|1"}
    for key, run in saved["runs"].items():
        assert (run["model"], run["augment"], run["seed"]) == ("lenet5", "shift2", int(key[-1]))
        assert [float(a) for a in run["rotation"]] == list(ROTATION_SUITE_ANGLES)        # 13 angles
        assert all(0 <= v <= 1 for v in run["rotation"].values())
        assert 0 < run["rotation_auc"] <= 1 and 0 <= run["affine-mnist"] <= 1
        assert run["parameters"] > 0 and run["train_images_per_second"] > 0 and run["eval_images_per_second"] > 0
        assert run["train_images"] == 300 and run["train_flops"] == run["train_flops_per_image"] * 300 > 1e6
    runs = saved["runs"]
    assert runs["lenet5|shift2|0"]["rotation"] != runs["lenet5|shift2|1"]["rotation"]  # the seeds differ
    # Both runs were trained (one progress line each) and the table shows mean ± std over the 2 seeds.
    assert printed.count("  lenet5|shift2|") == 2
    row = next(line for line in printed.splitlines() if line.startswith("| lenet5"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len([c for c in cells if re.fullmatch(r"\d+\.\d ± \d+\.\d", c)]) == 8   # 6 angles, AUC, affine
    assert cells[-1] == "2"                                                         # seeds
    auc_mean = 100 * sum(r["rotation_auc"] for r in runs.values()) / 2
    assert cells[9].startswith(f"{auc_mean:.1f} ± ")
    plot = out / "zoo_shift2.png"
    assert plot.is_file() and plot.stat().st_size > 1000 and f"plot: {plot}" in printed
    pareto = out / "pareto_shift2.png"
    assert pareto.is_file() and pareto.stat().st_size > 1000 and f"plot: {pareto}" in printed

    # Again with the same budget: nothing retrained, zoo.json unchanged, the same table.
    before = store.read_bytes()
    assert zoo.main(args) == 0
    again = capsys.readouterr().out
    assert "  lenet5|shift2|" not in again and store.read_bytes() == before
    assert row in again

    # Another budget in the same folder is refused (argparse's error: exit status 2), nothing written.
    with pytest.raises(SystemExit) as refused:
        zoo.main([*args[:args.index("--epochs") + 1], "2", *args[args.index("--epochs") + 2:]])
    assert refused.value.code == 2
    assert "holds runs of another budget" in capsys.readouterr().err
    assert store.read_bytes() == before


def test_bench_zoo_packs_runs_in_processes_sharing_the_device(data_dir: Path, tmp_path: Path) -> None:
    """--trials-per-gpu 2: two spawned processes train the two seeds at once (on the CPU here);
    the parent writes both into zoo.json, and each run is what a one-at-a-time run stores."""
    out = tmp_path / "zoo"
    done = subprocess.run([sys.executable, "benchmarks/bench_zoo.py", *ARGS, "--data-dir", str(data_dir),
                           "--out", str(out), "--trials-per-gpu", "2"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads((out / "zoo.json").read_text())["runs"]
    assert set(runs) == {"lenet5|shift2|0", "lenet5|shift2|1"}
    assert all(r["trials_per_gpu"] == 2 and r["train_images"] == 300 and 0 < r["rotation_auc"] <= 1
               for r in runs.values())
    assert runs["lenet5|shift2|0"]["rotation"] != runs["lenet5|shift2|1"]["rotation"]
    assert "sweep: 2 run(s) in " in done.stdout and "2 at once on cpu" in done.stdout
    assert done.stdout.count("  lenet5|shift2|") == 2


def test_paired_table_pairs_runs_by_seed_and_marks_what_the_interval_separates() -> None:
    zoo = bench_zoo()

    def run(model: str, seed: int, upright: float, at_45: float) -> dict:
        rotation = {"0": upright, "45": at_45, "90": 0.2}
        return {"model": model, "augment": "shift2", "seed": seed, "rotation": rotation,
                "rotation_auc": 0.5, "affine-mnist": 0.8}

    # B is 2-3 points better at 0° for every seed; at 45° the sign flips with the seed.
    runs = [run("a", 0, 0.95, 0.50), run("a", 1, 0.96, 0.60), run("a", 2, 0.94, 0.40),
            run("b", 0, 0.97, 0.55), run("b", 1, 0.99, 0.50), run("b", 2, 0.965, 0.45),
            run("b", 3, 0.10, 0.10)]  # seed 3 has no partner: left out of the pairing
    lines = zoo.paired_table(runs, "shift2", ["a", "b"])
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[0] == "a - b" and row[-1] == "3"
    assert row[1].startswith("-2.5 [") and row[1].endswith("]*")      # 0°: consistent, significant
    assert row[2][1:].startswith("0.0 [") and not row[2].endswith("*")  # 45°: noise


def test_decoder_variants_are_their_own_rows_with_both_parameter_counts() -> None:
    zoo = bench_zoo()
    effcaps = zoo.build_row_model("effcaps+decoder")
    capsnet = zoo.build_row_model("capsnet-decoder")
    assert effcaps.decoder is not None and capsnet.decoder is None
    # Like for like without decoders: 6,804,224 / 161,824 = 42x (51x against CapsNet with its decoder).
    assert zoo.classifier_parameters(effcaps) == 161_824
    assert zoo.classifier_parameters(capsnet) == zoo.classifier_parameters(zoo.build_row_model("capsnet")) == 6_804_224
    assert sum(p.numel() for p in zoo.build_row_model("capsnet").parameters()) == 8_215_568


def test_pareto_front_keeps_only_runs_nothing_beats_on_both_cost_and_accuracy() -> None:
    from capsnet_core.plots import pareto_front

    points = [(1e9, 90.0), (1e8, 80.0), (5e8, 79.0), (2e9, 95.0), (3e9, 94.0), (1e8, 70.0)]
    assert pareto_front(points) == [1, 0, 3]  # (5e8, 79) is beaten by (1e8, 80); (3e9, 94) by (2e9, 95)


def test_equal_compute_budget_gives_cheap_models_more_steps() -> None:
    zoo = bench_zoo()
    # 1e12 FLOPs: LeNet5 (1.5 MFLOP per training image) gets ~5,000 steps of 128, CapsNet (420 MFLOP) 18.
    lenet = zoo.budget_steps(1e12, 1.517e6)
    capsnet = zoo.budget_steps(1e12, 4.215e8)
    assert lenet == 1e12 // (1.517e6 * 128) and capsnet == 18 and lenet > 250 * capsnet
    assert zoo.budget_steps(1.0, 4.215e8) == 1  # never zero steps
