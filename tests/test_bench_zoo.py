"""benchmarks/bench_zoo.py (the leaderboard) run in-process on a tiny budget of real MNIST, so the
benchmark cannot rot between its GPU runs: what zoo.json holds, the table, the plot, resuming an
interrupted run, and refusing to mix budgets in one results folder."""

from __future__ import annotations

import importlib.util
import json
import re
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
    runs = saved["runs"]
    assert runs["lenet5|shift2|0"]["rotation"] != runs["lenet5|shift2|1"]["rotation"]  # the seeds differ
    # Both runs were trained (one progress line each) and the table shows mean ± std over the 2 seeds.
    assert printed.count("  lenet5|shift2|") == 2
    row = next(line for line in printed.splitlines() if line.startswith("| lenet5"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len([c for c in cells if re.fullmatch(r"\d+\.\d ± \d+\.\d", c)]) == 8   # 6 angles, AUC, affine
    assert cells[-1] == "2"                                                         # seeds
    auc_mean = 100 * sum(r["rotation_auc"] for r in runs.values()) / 2
    assert cells[8].startswith(f"{auc_mean:.1f} ± ")
    plot = out / "zoo_shift2.png"
    assert plot.is_file() and plot.stat().st_size > 1000 and f"plot: {plot}" in printed

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
