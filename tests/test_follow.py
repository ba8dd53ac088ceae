"""The live view of a following job: totals filled in from the spec, and the whole job's ETA."""

from __future__ import annotations

import pytest

from services.cli.follow import JobEta, ProgressView, fmt_eta


def test_job_eta_extrapolates_from_event_times_and_restarts_on_a_resumed_attempt() -> None:
    eta = JobEta()
    assert eta.update(1000.0, 0.25) is None             # one sighting: no rate yet
    assert eta.update(1010.0, 0.50) == pytest.approx(20.0)   # 25 % per 10 s, 50 % left
    assert eta.update(1020.0, 0.75) == pytest.approx(10.0)
    assert eta.update(1030.0, 0.20) is None              # a new attempt resumed further back
    assert eta.update(1040.0, 0.60) == pytest.approx(10.0)
    assert eta.update("junk", 0.7) is None and eta.update(1050.0, 1.5) is None


def test_fmt_eta() -> None:
    assert fmt_eta(None) == ""
    assert fmt_eta(42.4) == "job ETA 42s"
    assert fmt_eta(185) == "job ETA 3m05s"
    assert fmt_eta(3725) == "job ETA 1h02m"


def test_piped_epoch_lines_show_the_spec_total_and_the_eta(capsys: pytest.CaptureFixture[str]) -> None:
    view = ProgressView(tty=False, epochs=4)
    for n, at in ((1, 100.0), (2, 130.0), (3, 160.0)):
        view.handle({"type": "progress", "at": at,
                     "data": {"type": "epoch", "epoch": n, "loss": 0.5, "accuracy": 0.9, "val_accuracy": 0.88}})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] epoch ")[1].split()[0] for line in lines] == ["1/4", "2/4", "3/4"]
    assert "ETA" not in lines[0]
    assert lines[1].endswith("job ETA 1m00s") and lines[2].endswith("job ETA 30s")


def test_tty_bar_is_labelled_with_the_total_and_carries_the_eta(capsys: pytest.CaptureFixture[str]) -> None:
    view = ProgressView(tty=True, epochs=2)
    for step, at in ((10, 0.0), (50, 8.0)):  # 5 % then 25 % of the job's 200 steps: 75 % left at 20 %/8 s
        view.handle({"type": "progress", "at": at, "data": {"type": "step", "epoch": 1, "step": step,
                                                            "steps_per_epoch": 100, "loss": 1.0}})
    assert view._bar is not None and view._bar.label == "epoch 1/2"
    assert view._bar.current_item.endswith("job ETA 30s")  # (click draws nothing when not on a real TTY)
    view.close()
