"""Live training gauges of the jobs a worker runs (``TrainingMetrics``), fed by the training
loop's progress events and labelled ``job_id`` and ``model``; bounded in jobs and angles."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from capsnet_core.suites import SUITE_RESULTS
from services.metrics.labels import angle_label, label_value
from services.queue.parsing import finite, first

_JOB_LABELS = ("job_id", "model")
# A job's result series: (its gauge, the angle or suite label); kept to remove them later.
_Result = tuple[Gauge, str]


class TrainingMetrics:
    """Live gauges of the jobs this worker is training, labelled ``job_id`` and ``model``.

    ``observe(job_id, model, event)`` takes the training loop's progress events
    (``capsnet_core.train`` ``on_progress``); keys that are missing or None are ignored:

    * ``epoch`` -> capsnet_train_epoch; ``step`` (within the epoch, 1-based) with
      ``steps_per_epoch`` -> capsnet_train_step as the global step ``(epoch-1)*steps_per_epoch+step``
      (``step`` as given when either is missing)
    * ``loss`` / ``train_loss`` -> capsnet_train_loss; ``accuracy`` / ``train_accuracy`` ->
      capsnet_train_accuracy_ratio; ``lr`` -> capsnet_train_learning_rate
    * ``images_per_second`` -> capsnet_train_images_per_second; ``epoch_seconds`` ->
      capsnet_train_epoch_duration_seconds
    * ``test_accuracy``: a dict ``{angle: ratio}`` -> capsnet_test_accuracy_ratio{angle}; a plain
      float (the upright accuracy of an ``epoch`` event) -> the ``angle="0"`` series
    * ``suite_accuracy``: a dict ``{result: ratio}`` of the test suites' summaries (``eval`` and last
      ``epoch`` events) -> capsnet_suite_accuracy_ratio{suite}; ``suite`` is one of
      ``capsnet_core.suites.SUITE_RESULTS`` (rotation_auc: the mean accuracy over 0..180 degrees;
      affine-mnist / affnist: accuracy on that set), other keys are ignored
    * ``gpu_memory_bytes`` (only set on CUDA) -> capsnet_gpu_memory_used_bytes

    ``remove(job_id)`` drops all of a job's series; with ``result_linger_seconds`` > 0 its test
    and suite accuracies (the job's result, set in its last seconds) are dropped that much later, so a
    scrape every few seconds still records them (observing the job again keeps them).  At most
    ``max_jobs`` jobs are kept (and as many lingering): observing one more evicts the least
    recently updated, so a missed ``remove`` cannot grow cardinality.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, max_jobs: int = 32,
                 max_angles: int = 64, result_linger_seconds: float = 0.0) -> None:
        self.max_jobs = max_jobs
        self.max_angles = max_angles
        self.result_linger_seconds = float(result_linger_seconds)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*_JOB_LABELS, *extra], registry=registry)

        self.epoch = gauge("capsnet_train_epoch", "Current epoch of a running job (1-based).")
        self.step = gauge("capsnet_train_step", "Optimizer steps done by a running job (global step).")
        self.loss = gauge("capsnet_train_loss", "Latest training loss of a running job.")
        self.accuracy = gauge("capsnet_train_accuracy_ratio", "Latest training accuracy (0..1) of a running job.")
        self.learning_rate = gauge("capsnet_train_learning_rate", "Current learning rate of a running job.")
        self.images_per_second = gauge("capsnet_train_images_per_second",
                                       "Training throughput of a running job (all ranks).")
        self.epoch_duration = gauge("capsnet_train_epoch_duration_seconds",
                                    "Wall time of the last finished epoch of a running job.")
        self.test_accuracy = gauge("capsnet_test_accuracy_ratio",
                                   "Test accuracy (0..1) of a running job by evaluation rotation angle (degrees).",
                                   ("angle",))
        self.suite_accuracy = gauge(
            "capsnet_suite_accuracy_ratio",
            "Test suite result (0..1) of a running job: suite=rotation_auc (mean accuracy over 0..180 degrees), "
            "affine-mnist or affnist (accuracy on that set).", ("suite",))
        self.gpu_memory = gauge("capsnet_gpu_memory_used_bytes",
                                "Peak CUDA memory allocated by a running job (rank 0); only on CUDA.")
        self._plain = (self.epoch, self.step, self.loss, self.accuracy, self.learning_rate,
                       self.images_per_second, self.epoch_duration, self.gpu_memory)
        # job_id label -> (model label, result series seen as (gauge, angle or suite label));
        # ordered by last update
        self._jobs: OrderedDict[str, tuple[str, set[_Result]]] = OrderedDict()
        # ended jobs whose results linger: job_id label -> (model label, results, timer)
        self._lingering: OrderedDict[str, tuple[str, set[_Result], threading.Timer]] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, job_id: str, model: str, event: Mapping[str, Any]) -> None:
        job, model_l = label_value(job_id), label_value(model)
        with self._lock:
            lingering = self._lingering.pop(job, None)
            if lingering is not None:  # the job runs again on this worker (a retry)
                lingering[2].cancel()
                if lingering[0] == model_l and job not in self._jobs:
                    self._jobs[job] = (model_l, lingering[1])
                else:
                    _discard_results(job, lingering[0], lingering[1])
            entry = self._jobs.get(job)
            if entry is not None and entry[0] != model_l:  # model changed: drop old series
                self._remove_locked(job)
                entry = None
            if entry is None:
                entry = (model_l, set())
                self._jobs[job] = entry
                while len(self._jobs) > self.max_jobs:
                    self._remove_locked(next(iter(self._jobs)))
            self._jobs.move_to_end(job)
            results = entry[1]
            labels = (job, model_l)

            def put(g: Gauge, value: Any) -> None:
                number = _number(value)
                if number is not None:
                    g.labels(*labels).set(number)

            epoch, step, per_epoch = _number(event.get("epoch")), _number(event.get("step")), \
                _number(event.get("steps_per_epoch"))
            put(self.epoch, epoch)
            if step is not None:
                put(self.step, (epoch - 1) * per_epoch + step if epoch is not None and per_epoch else step)
            put(self.loss, first(event, "loss", "train_loss"))
            put(self.accuracy, first(event, "accuracy", "train_accuracy"))
            put(self.learning_rate, event.get("lr"))
            put(self.images_per_second, event.get("images_per_second"))
            put(self.epoch_duration, event.get("epoch_seconds"))
            put(self.gpu_memory, event.get("gpu_memory_bytes"))
            test = event.get("test_accuracy")
            if isinstance(test, Mapping):
                items = list(test.items())
            elif _number(test) is not None:
                items = [("0", test)]
            else:
                items = []
            n_angles = sum(1 for g, _ in results if g is self.test_accuracy)
            for angle, value in items:
                number = _number(value)
                key = angle_label(angle)
                new = (self.test_accuracy, key) not in results
                if number is None or (new and n_angles >= self.max_angles):
                    continue
                n_angles += new
                results.add((self.test_accuracy, key))
                self.test_accuracy.labels(*labels, key).set(number)
            suites = event.get("suite_accuracy")
            for suite, value in (suites.items() if isinstance(suites, Mapping) else ()):
                number = _number(value)
                if number is None or suite not in SUITE_RESULTS:  # bounded: only the known results
                    continue
                results.add((self.suite_accuracy, suite))
                self.suite_accuracy.labels(*labels, suite).set(number)

    def remove(self, job_id: str) -> None:
        """Drop every series of ``job_id`` (call when the job ends, whatever the outcome); its
        test and suite accuracies after ``result_linger_seconds``."""
        job = label_value(job_id)
        with self._lock:
            entry = self._jobs.get(job)
            if self.result_linger_seconds <= 0 or entry is None or not entry[1]:
                self._remove_locked(job)
                return
            del self._jobs[job]
            model_l, results = entry
            for g in self._plain:
                _discard(g, job, model_l)
            timer = threading.Timer(self.result_linger_seconds, lambda: self._expire(job, timer))
            timer.daemon = True
            self._lingering[job] = (model_l, results, timer)
            while len(self._lingering) > self.max_jobs:
                old_job, (old_model, old_results, old_timer) = self._lingering.popitem(last=False)
                old_timer.cancel()
                _discard_results(old_job, old_model, old_results)
        timer.start()

    def _expire(self, job: str, timer: threading.Timer) -> None:
        with self._lock:
            lingering = self._lingering.get(job)
            if lingering is None or lingering[2] is not timer:  # observed again since, or evicted
                return
            del self._lingering[job]
            _discard_results(job, lingering[0], lingering[1])

    def gauges(self) -> list[Gauge]:
        return [*self._plain, self.test_accuracy, self.suite_accuracy]

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def lingering(self) -> list[str]:
        """Ended jobs whose test and suite accuracies are still exported."""
        with self._lock:
            return list(self._lingering)

    def _remove_locked(self, job: str) -> None:
        entry = self._jobs.pop(job, None)
        if entry is None:
            return
        model_l, results = entry
        for g in self._plain:
            _discard(g, job, model_l)
        _discard_results(job, model_l, results)


def _number(value: Any) -> float | None:
    """A progress event's number: finite, and not text (numeric text is not a number there)."""
    return None if isinstance(value, str) else finite(value)


def _discard(g: Gauge, *labels: str) -> None:
    try:
        g.remove(*labels)
    except KeyError:
        pass


def _discard_results(job: str, model: str, results: Iterable[_Result]) -> None:
    for g, key in results:
        _discard(g, job, model, key)

