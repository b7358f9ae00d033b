"""Background work of the gateway: the study-completion sweep and the processing worker.

An APScheduler `BackgroundScheduler` runs short periodic jobs: the completion sweep
(`receiving` -> `ready`, every `sweep_interval_s`) and whatever else is added with
`add_interval_job` (retries, retention). Processing a study can take seconds (model
inference), so it does not run in a scheduler job: a `ProcessingWorker` thread runs
the `process_ready` callable whenever the sweep found ready studies, and every
`idle_interval_s` anyway to pick up studies made ready elsewhere (start-up recovery,
another process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import utcnow
from db.work import mark_ready
from gateway.config import StudyConfig
from gateway.scp import database_problem

log = logging.getLogger(__name__)

# Claims and processes ready studies until none is left; returns how many it processed.
ProcessReady = Callable[[], int]

DEFAULT_SWEEP_INTERVAL_S = 0.5
# How long the worker waits after `process_ready` raised before it tries again.
_RETRY_AFTER_ERROR_S = 5.0


class StudyCompletion:
    """The completion sweep: studies whose delivery is over become `ready`."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        study: StudyConfig,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.study = study
        self.clock = clock

    def __call__(self) -> list[int]:
        """Mark ready what is complete now; returns those study ids (none on a DB error)."""
        try:
            with self.sessions() as session:
                ready = mark_ready(
                    session,
                    self.clock(),
                    self.study.quiet_period_s,
                    self.study.unreleased_timeout_s,
                )
        except SQLAlchemyError as error:
            # Usually the lock held by a long writer; the next sweep tries again.
            log.warning("study completion sweep skipped: %s", database_problem(error))
            log.debug("sweep error", exc_info=True)
            return []
        if ready:
            log.info("%d stud%s ready", len(ready), "y" if len(ready) == 1 else "ies")
        return ready


class ProcessingWorker:
    """A thread that runs `process_ready` when woken, and every `idle_interval_s`."""

    def __init__(self, process_ready: ProcessReady, *, idle_interval_s: float = 5.0) -> None:
        self.process_ready = process_ready
        self.idle_interval_s = idle_interval_s
        self.processed = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radgate-processing", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.idle_interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.processed += self.process_ready()
            except Exception:
                log.exception("processing ready studies failed; trying again shortly")
                self._stopping.wait(_RETRY_AFTER_ERROR_S)

    def stop(self, timeout_s: float) -> bool:
        """Let the study in progress finish (at most `timeout_s`); False if it did not."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()


class GatewayScheduler:
    """The sweep job, any further periodic jobs, and the processing worker."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        study: StudyConfig,
        process_ready: ProcessReady | None = None,
        *,
        sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.completion = StudyCompletion(sessions, study, clock)
        self.sweep_interval_s = sweep_interval_s
        self.worker = ProcessingWorker(process_ready) if process_ready is not None else None
        # One run of a job at a time; a run that was missed is not made up for.
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        # APScheduler logs two INFO lines per job run: every 0.5 s is noise. Its
        # warnings and job errors still come through.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self.add_interval_job(self.sweep, sweep_interval_s, "study completion sweep")

    def add_interval_job(self, func: Callable[[], object], seconds: float, name: str) -> None:
        """Run `func` every `seconds` in the scheduler's thread pool (keep it short)."""
        self._scheduler.add_job(func, "interval", seconds=seconds, name=name, id=name)

    def sweep(self) -> int:
        """One completion sweep; wakes the worker when studies became ready."""
        ready = self.completion()
        if ready and self.worker is not None:
            self.worker.wake()
        return len(ready)

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
            # Studies left ready by an earlier run are processed without waiting.
            self.worker.wake()
        self._scheduler.start()

    @property
    def running(self) -> bool:
        """The periodic jobs run, and so does the processing worker when there is one."""
        worker_alive = self.worker is None or self.worker.alive
        return bool(self._scheduler.running) and worker_alive

    def shutdown(self, timeout_s: float) -> bool:
        """Stop the jobs, then let processing finish within `timeout_s`; False if it did not."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        if self.worker is None:
            return True
        return self.worker.stop(timeout_s)
