"""A sweep's trials each get their own series (services.metrics.trials), bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.metrics.trials import TrialMetrics, trial_label


def _exposed(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_trial_label_is_the_index_or_nothing() -> None:
    assert trial_label("t003-lenet5-shift2-lr0.001-s0") == "t003"
    assert trial_label("t12") == "t12"
    for junk in (None, 3, "", "x003-a", "t-a", "tabc-1", {"k": 1}):
        assert trial_label(junk) is None


def test_each_trial_has_its_own_series_and_the_job_leaves_with_them() -> None:
    registry = CollectorRegistry()
    trials = TrialMetrics(registry, max_jobs=2, max_trials=2)
    trials.observe("j-1", {"type": "trial", "trial": "t000-lenet5-a", "epoch": 1, "val_accuracy": 0.5})
    trials.observe("j-1", {"type": "trial", "trial": "t001-capsnet-a", "epoch": 2, "val_accuracy": 0.75})
    trials.observe("j-1", {"type": "trial", "trial": "t000-lenet5-a", "epoch": 2})  # a later report
    trials.observe("j-1", {"type": "trial", "trial": "t002-lenet5-b", "epoch": 1})  # past max_trials
    text = _exposed(registry)
    assert 'capsnet_tune_trial_epoch{job_id="j-1",trial="t000"} 2.0' in text
    assert 'capsnet_tune_trial_epoch{job_id="j-1",trial="t001"} 2.0' in text
    assert 'capsnet_tune_trial_val_accuracy_ratio{job_id="j-1",trial="t000"} 0.5' in text
    assert 'trial="t002"' not in text
    trials.observe("j-2", {"trial": "t000-x", "epoch": 1})
    trials.observe("j-3", {"trial": "t000-x", "epoch": 1})  # max_jobs: j-1, the least recent, goes
    text = _exposed(registry)
    assert 'job_id="j-1"' not in text and 'job_id="j-3"' in text
    trials.remove("j-3")
    trials.remove("j-404")
    text = _exposed(registry)
    assert 'job_id="j-3"' not in text and 'job_id="j-2"' in text
