"""benchmarks/bench_tta.py on a tiny budget of real MNIST: it stops at the target, measured on the
validation split, and reports the test set only after."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # trains two models
def test_training_stops_once_the_validation_target_is_reached(data_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_tta", REPO_ROOT / "benchmarks" / "bench_tta.py")
    tta = importlib.util.module_from_spec(spec)
    sys.modules["bench_tta"] = tta  # its dataclasses look their module up while being defined
    spec.loader.exec_module(tta)
    assert tta.main(["--device", "cpu", "--quick", "--models", "lenet5,effcaps", "--data-dir", str(data_dir),
                     "--target", "lenet5=0.2", "--target", "effcaps=1.0"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| lenet5") or line.startswith("| effcaps")}
    assert rows["lenet5"][2] == "yes" and rows["lenet5"][5] == "1"     # 20 % is reached after one epoch
    assert rows["effcaps"][2] == "NO" and rows["effcaps"][5] == "2"    # 100 % never: all --max-epochs run
    assert float(rows["lenet5"][6].rstrip(" %")) >= 20.0
    assert "validation split 500" in out
