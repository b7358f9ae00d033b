"""Prometheus metrics of one gateway process.

`GatewayMetrics` owns a `CollectorRegistry` (never the global one, so two gateways in
one test process do not share counters) and the counters and histograms that the
receiver, the pipeline and the forwarder update through small hooks. Each of those
takes `metrics: GatewayMetrics | None`; None (the default) records nothing.

Queue depths are not counted as work moves: `QueueDepthCollector` reads them from the
database at scrape time, so they are right even for work left by an earlier run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import ForwardJob, ForwardJobState, Study, StudyState, utcnow

log = logging.getLogger(__name__)

# Receiving one C-STORE (spool write and database row) takes milliseconds.
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Inference and Grad-CAM per image: tens of milliseconds on a GPU, seconds on a slow CPU.
MODEL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# From the first instance received to the study delivered: the quiet period and backoff
# included, so seconds to hours.
END_TO_END_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Top-class probability of a two-class model is at least 0.5.
PROBABILITY_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class GatewayMetrics:
    """The counters and histograms of one gateway, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.started_at = utcnow()
        r = self.registry
        self.instances_received = Counter(
            "radgate_instances_received",
            "SOP instances stored and acknowledged (duplicates excluded), by calling AE title",
            ["calling_aet"],
            registry=r,
        )
        self.stores_refused = Counter(
            "radgate_stores_refused",
            "C-STORE requests answered with a failure status, by status",
            ["status"],
            registry=r,
        )
        self.instances_rejected = Counter(
            "radgate_instances_rejected",
            "Instances the gate rejected, by reason",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter(
            "radgate_predictions", "Instances classified, by label", ["label"], registry=r
        )
        self.body_part_mismatches = Counter(
            "radgate_body_part_mismatches",
            "Classified instances whose BodyPartExamined names the other class",
            registry=r,
        )
        self.forward_attempts = Counter(
            "radgate_forward_attempts",
            "Forward job attempts, by destination and outcome",
            ["destination", "outcome"],
            registry=r,
        )
        self.top_probability = Histogram(
            "radgate_prediction_top_probability",
            "Probability of the predicted class",
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.ingest_seconds = Histogram(
            "radgate_ingest_seconds",
            "Time to store and record one received instance",
            buckets=INGEST_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "radgate_inference_seconds",
            "Model inference time per image",
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.gradcam_seconds = Histogram(
            "radgate_gradcam_seconds",
            "Grad-CAM time per image",
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "radgate_end_to_end_seconds",
            "From a study's first instance received to its delivery to a destination",
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )

    # --- hooks -----------------------------------------------------------------------

    def stored(self, calling_aet: str, seconds: float, *, duplicate: bool) -> None:
        if not duplicate:
            self.instances_received.labels(calling_aet=calling_aet or "-").inc()
        self.ingest_seconds.observe(seconds)

    def refused(self, status: int) -> None:
        self.stores_refused.labels(status=f"0x{status:04X}").inc()

    def rejected(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.instances_rejected.labels(reason=reason).inc()

    def classified(
        self,
        label: str,
        top_probability: float,
        inference_ms: float,
        gradcam_ms: float | None,
        *,
        body_part_mismatch: bool,
    ) -> None:
        self.predictions.labels(label=label).inc()
        self.top_probability.observe(top_probability)
        self.inference_seconds.observe(inference_ms / 1000)
        if gradcam_ms is not None:
            self.gradcam_seconds.observe(gradcam_ms / 1000)
        if body_part_mismatch:
            self.body_part_mismatches.inc()

    def forward_attempt(
        self, destination: str, outcome: str, first_received_at: datetime | None = None
    ) -> None:
        """One attempt; `first_received_at` given when the job was delivered."""
        self.forward_attempts.labels(destination=destination, outcome=outcome).inc()
        if first_received_at is not None:
            elapsed = (utcnow() - first_received_at).total_seconds()
            self.end_to_end_seconds.observe(max(elapsed, 0.0))

    def watch_queues(self, sessions: sessionmaker[Session]) -> None:
        """Add the queue depths, read from the database at each scrape."""
        self.registry.register(QueueDepthCollector(sessions))


# The states that make up each queue.
STUDY_QUEUES = {
    "waiting_for_completion": StudyState.RECEIVING,
    "ready": StudyState.READY,
    "processing": StudyState.PROCESSING,
}
FORWARD_QUEUES = {
    "forward_pending": ForwardJobState.PENDING,
    "forward_in_progress": ForwardJobState.IN_PROGRESS,
    "dead": ForwardJobState.DEAD,
}


class QueueDepthCollector(Collector):
    """`radgate_queue_depth{queue=...}` from the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Described without a query, so registering does not touch the database.
        yield GaugeMetricFamily("radgate_queue_depth", "Work waiting, by queue", labels=["queue"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "radgate_queue_depth", "Work waiting, by queue", labels=["queue"]
        )
        try:
            depths = queue_depths(self.sessions)
        except SQLAlchemyError as error:
            # A scrape must not fail because the database is locked for a moment;
            # /readyz reports a database that is really unreachable.
            log.warning("queue depths not collected: %s", error)
            return
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


def queue_depths(sessions: sessionmaker[Session]) -> dict[str, int]:
    """How many studies and forward jobs are in each queue now."""
    with sessions() as session:
        studies = dict(
            session.execute(select(Study.state, func.count()).group_by(Study.state)).tuples().all()
        )
        jobs = dict(
            session.execute(select(ForwardJob.state, func.count()).group_by(ForwardJob.state))
            .tuples()
            .all()
        )
    depths = {queue: int(studies.get(state, 0)) for queue, state in STUDY_QUEUES.items()}
    depths.update({queue: int(jobs.get(state, 0)) for queue, state in FORWARD_QUEUES.items()})
    return depths
