"""Processing a ready study: gate -> inference -> outputs -> record -> hand on to routing.

A worker claims one ready study in a transaction (`db.work.claim_study`), so two workers
never process the same study. All of a study's results are committed in one transaction
at the end; derived files (Grad-CAM SC, tagged originals, SR, PNGs) are written before it
under names derived from their UIDs, and those UIDs are derived from the source instance
and the model. So a process killed half way leaves no record, and the rerun after a
restart writes the very same files again instead of duplicates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    AuditEvent,
    GateDecision,
    Instance,
    InstanceState,
    Output,
    OutputKind,
    Prediction,
    Study,
)
from db.work import claim_study, fail_study, finish_study, new_worker_id
from gateway import outputs
from gateway.config import Config, GateConfig
from gateway.gate import GateResult, body_part_mismatch, evaluate
from gateway.metrics import GatewayMetrics
from gateway.phi import identifying_values, patient_values, redact
from gateway.spool import Spool
from inference.classifier import Classifier
from inference.errors import UndecodablePixels
from inference.gradcam import gradcam, upsample_to
from inference.overlay import png_bytes, render_overlay
from inference.preprocess import Prepared, PreprocessSpec, prepare

log = logging.getLogger(__name__)

# Derived objects get UIDs under the radgate root, derived from what they describe.
UID_PREFIX = "1.2.826.0.1.3680043.10.1455."
# Due forward jobs are looked for this often (and at once after a study is routed).
FORWARD_INTERVAL_S = 1.0
FORWARD_STOP_TIMEOUT_S = 30.0


def derived_uid(*parts: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=list(parts))


@dataclass
class InstanceWork:
    """One instance as it moves through the pipeline."""

    row_id: int
    sop_instance_uid: str
    spool_path: str
    received_at: datetime
    dataset: Dataset | None = None
    gate: GateResult | None = None
    result: outputs.InstanceResult | None = None
    prediction: dict[str, Any] = field(default_factory=dict)
    derived: list[dict[str, Any]] = field(default_factory=list)


class Pipeline:
    """Claims ready studies and processes them with one model loaded for the process."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        classifier: Classifier,
        *,
        worker_id: str | None = None,
        on_processed: Callable[[Session, int], None] | None = None,
        spool: Spool | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.sessions = sessions
        self.classifier = classifier
        self.worker_id = worker_id or new_worker_id()
        self.spool_root = Path(config.storage.spool_dir)
        # Derived objects go through the spool's durable, hash-named store.
        self.spool = spool or Spool(self.spool_root)
        self.on_processed = on_processed
        self.spec = classifier.loaded.card.preprocessing
        self.weights_sha256 = classifier.loaded.card.sha256

    # ------------------------------------------------------------------ claiming

    def process_ready(self, limit: int | None = None) -> int:
        """Claim and process ready studies until none is left; returns how many."""
        done = 0
        while limit is None or done < limit:
            study_id = claim_study(self.sessions, self.worker_id)
            if study_id is None:
                break
            self.process_claimed(study_id)
            done += 1
        return done

    def process_claimed(self, study_id: int) -> None:
        try:
            self._process(study_id)
        except Exception as error:  # one bad study must not stop the gateway
            # The message may quote a header value; the traceback is for debug logs only.
            problem = redact(f"{type(error).__name__}: {error}", self._patient_values(study_id))
            log.error("study %d failed: %s", study_id, problem)
            log.debug("study %d failed", study_id, exc_info=True)
            with self.sessions() as session:
                try:
                    fail_study(session, study_id, self.worker_id, problem)
                except LookupError:
                    log.warning("study %d: claim lost before failure could be recorded", study_id)

    def _patient_values(self, study_id: int) -> list[str]:
        """The study's patient name, ID and accession number, as recorded on receipt."""
        with self.sessions() as session:
            study = session.get(Study, study_id)
            if study is None:
                return []
            return identifying_values(
                [study.patient_name, study.patient_id, study.accession_number]
            )

    # ------------------------------------------------------------------ stages

    def _load_work(self, study_id: int) -> tuple[str, list[InstanceWork]]:
        with self.sessions() as session:
            study = session.get(Study, study_id)
            if study is None:
                raise LookupError(f"no study {study_id}")
            rows = session.scalars(
                select(Instance)
                .where(Instance.study_id == study_id, Instance.state == InstanceState.RECEIVED)
                .order_by(Instance.received_at, Instance.id)
            ).all()
            work = [
                InstanceWork(row.id, row.sop_instance_uid, row.spool_path, row.received_at)
                for row in rows
            ]
            return study.study_uid, work

    def _read_and_gate(self, item: InstanceWork) -> None:
        item.dataset, item.gate = read_and_gate(
            self.spool_root / item.spool_path, self.config.gate, self.spec
        )

    def _classify(self, items: Sequence[InstanceWork], started: float) -> None:
        passed = [item for item in items if item.gate and item.gate.passed]
        batch_size = self.classifier.batch_size
        for start in range(0, len(passed), batch_size):
            chunk = passed[start : start + batch_size]
            prepared: list[Prepared] = [item.gate.prepared for item in chunk]  # type: ignore[union-attr]
            tensors = [p.tensor for p in prepared]
            predictions = self.classifier.predict(tensors)
            heatmaps: list[np.ndarray | None] = [None] * len(chunk)
            gradcam_ms = None
            if self.config.outputs.gradcam:
                tick = time.perf_counter()
                batch = torch.stack(tensors)
                maps = gradcam(self.classifier.loaded.model, batch).heatmaps.numpy()
                gradcam_ms = (time.perf_counter() - tick) * 1000 / len(chunk)
                heatmaps = list(maps)
            for item, prepared_item, prediction, heatmap in zip(
                chunk, prepared, predictions, heatmaps, strict=True
            ):
                assert item.dataset is not None
                mismatch = body_part_mismatch(item.dataset, prediction.label)
                item.result = outputs.InstanceResult(
                    gate_passed=True,
                    reasons=(),
                    label=prediction.label,
                    probability=prediction.probability,
                    probabilities=prediction.probabilities,
                    model_id=prediction.model_id,
                    weights_sha256=self.weights_sha256,
                    body_part_mismatch=mismatch,
                )
                queue_wait = (started - item.received_at.timestamp()) * 1000
                item.prediction = {
                    "label": prediction.label,
                    "probabilities": prediction.probabilities,
                    "top_probability": prediction.probability,
                    "model_id": prediction.model_id,
                    "device": str(self.classifier.device),
                    "inference_ms": prediction.inference_ms,
                    "gradcam_ms": gradcam_ms,
                    "queue_wait_ms": max(queue_wait, 0.0),
                    "body_part_mismatch": mismatch,
                    "heatmap": heatmap,
                    "display": prepared_item.display,
                    "box": prepared_item.box,
                }

    def _write_outputs(
        self, study_uid: str, items: Sequence[InstanceWork]
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Write the derived objects; returns their records and the ones that failed.

        A source whose attributes highdicom refuses (say a malformed PatientSex) loses that
        one output, recorded as an error event; the study's other results still count.
        """
        config = self.config.outputs
        written: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []

        def attempt(kind: str, uid: str, make: Callable[[], dict[str, Any]]) -> None:
            try:
                written.append(make())
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                # highdicom and pydicom quote the value they refuse, which may be the
                # patient's name or ID.
                sources = (item.dataset for item in items if item.dataset is not None)
                problem = redact(str(error), patient_values(sources))
                log.warning("%s for %s not written: %s", kind, uid, problem)
                failures.append({"output": kind, "sop_instance_uid": uid, "error": problem})

        for item in items:
            if item.dataset is None:
                continue
            if item.result is None:
                reasons = item.gate.reasons if item.gate else ("not processed",)
                item.result = outputs.InstanceResult(
                    gate_passed=False,
                    reasons=tuple(reasons),
                    label=None,
                    probability=None,
                    probabilities=None,
                    model_id=None,
                    weights_sha256=None,
                )
            if config.gradcam and item.prediction.get("heatmap") is not None:
                attempt(
                    "gradcam_sc",
                    item.sop_instance_uid,
                    partial(self._gradcam_output, item),
                )
            if config.tag_originals:
                attempt(
                    "tagged_original",
                    item.sop_instance_uid,
                    partial(self._tagged_output, item),
                )
        reported = [item for item in items if item.dataset is not None and item.result is not None]
        if config.structured_report and reported:
            attempt("report_sr", study_uid, lambda: self._report_output(study_uid, reported))
        return written, failures

    def _tagged_output(self, item: InstanceWork) -> dict[str, Any]:
        assert item.dataset is not None and item.result is not None
        tagged = outputs.tag_original(item.dataset, item.result)
        path = self._store(tagged, "tagged", f"{item.sop_instance_uid}/{self.weights_sha256}")
        return {
            "instance_id": item.row_id,
            "kind": OutputKind.TAGGED_ORIGINAL,
            "sop_instance_uid": item.sop_instance_uid,
            "series_uid": str(tagged.SeriesInstanceUID),
            "sop_class_uid": str(tagged.SOPClassUID),
            "spool_path": path,
            "png_path": self._original_png(item),
        }

    def _report_output(self, study_uid: str, reported: Sequence[InstanceWork]) -> dict[str, Any]:
        key = "/".join(sorted(item.sop_instance_uid for item in reported))
        series_uid = derived_uid(study_uid, "report-series", self.weights_sha256)
        sop_uid = derived_uid(study_uid, "report", key, self.weights_sha256)
        report = outputs.result_report(
            [item.dataset for item in reported],  # type: ignore[misc]
            [item.result for item in reported],  # type: ignore[misc]
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
        )
        path = self._store(report, "report", sop_uid)
        return {
            "instance_id": None,
            "kind": OutputKind.REPORT_SR,
            "sop_instance_uid": sop_uid,
            "series_uid": series_uid,
            "sop_class_uid": str(report.SOPClassUID),
            "spool_path": path,
            "png_path": None,
        }

    def _store(self, dataset: Dataset, kind: str, key: str) -> str:
        return self.spool.store_derived(outputs.encode_dataset(dataset), key=key, kind=kind).path

    def _store_png(self, picture: np.ndarray, key: str) -> str:
        return self.spool.store_derived(png_bytes(picture), key=key, kind="png", suffix=".png").path

    def _original_png(self, item: InstanceWork) -> str | None:
        display = item.prediction.get("display")
        if display is None:
            return None
        return self._store_png(display, f"{item.sop_instance_uid}/original")

    def _gradcam_output(self, item: InstanceWork) -> dict[str, Any]:
        model_key = self.weights_sha256
        assert item.dataset is not None and item.result is not None
        display = item.prediction["display"]
        height, width = display.shape[:2]
        heat = upsample_to(item.prediction["heatmap"], item.prediction["box"], (width, height))
        overlay = render_overlay(
            display,
            heat,
            item.result.label or "",
            item.result.probability or 0.0,
            title="radgate Grad-CAM",
        )
        source_series = str(item.dataset.get("SeriesInstanceUID", ""))
        series_uid = derived_uid(source_series, "gradcam-series", model_key)
        sop_uid = derived_uid(item.sop_instance_uid, "gradcam", model_key)
        capture = outputs.gradcam_secondary_capture(
            item.dataset,
            overlay,
            item.result,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
        )
        path = self._store(capture, "gradcam", sop_uid)
        png_path = self._store_png(overlay, sop_uid)
        return {
            "instance_id": item.row_id,
            "kind": OutputKind.GRADCAM_SC,
            "sop_instance_uid": sop_uid,
            "series_uid": series_uid,
            "sop_class_uid": str(capture.SOPClassUID),
            "spool_path": path,
            "png_path": png_path,
        }

    def _record(
        self,
        study_id: int,
        study_uid: str,
        items: Sequence[InstanceWork],
        written: Sequence[dict[str, Any]],
        failures: Sequence[dict[str, str]] = (),
    ) -> None:
        now = datetime.now(UTC)
        with self.sessions() as session, session.begin():
            for item in items:
                instance = session.get(Instance, item.row_id)
                if instance is None:
                    continue
                gate = item.gate or GateResult(False, ("not processed",))
                session.merge(
                    GateDecision(
                        instance_id=item.row_id,
                        passed=gate.passed,
                        reasons=list(gate.reasons),
                        decided_at=now,
                    )
                )
                if item.prediction:
                    values = {
                        k: v
                        for k, v in item.prediction.items()
                        if k not in ("heatmap", "display", "box")
                    }
                    session.merge(
                        Prediction(
                            instance_id=item.row_id,
                            weights_sha256=self.weights_sha256,
                            created_at=now,
                            **values,
                        )
                    )
                    instance.state = InstanceState.CLASSIFIED
                else:
                    instance.state = InstanceState.REJECTED
            for entry in written:
                existing = session.scalar(
                    select(Output).where(Output.sop_instance_uid == entry["sop_instance_uid"])
                )
                if existing is None:
                    session.add(Output(study_id=study_id, created_at=now, **entry))
            session.flush()
            for item in items:
                detail: dict[str, Any] = {
                    "sop_instance_uid": item.sop_instance_uid,
                    "passed": bool(item.gate and item.gate.passed),
                }
                if item.gate and not item.gate.passed:
                    detail["reasons"] = list(item.gate.reasons)
                if item.prediction:
                    detail["label"] = item.prediction["label"]
                    detail["probability"] = round(item.prediction["top_probability"], 6)
                    detail["body_part_mismatch"] = item.prediction["body_part_mismatch"]
                _audit(session, "decision", detail, study_uid, now)
            for failure in failures:
                _audit(session, "error", {"event": "output not written", **failure}, study_uid, now)
        with self.sessions() as session:
            state = finish_study(session, study_id, self.worker_id)
        log.info(
            "study %s processed: %d instance(s), %d classified -> %s",
            study_uid,
            len(items),
            sum(1 for item in items if item.prediction),
            state.value,
        )
        if self.on_processed is not None:
            with self.sessions() as session:
                self.on_processed(session, study_id)

    def _process(self, study_id: int) -> None:
        started = time.time()
        study_uid, items = self._load_work(study_id)
        for item in items:
            self._read_and_gate(item)
        self._classify(items, started)
        written, failures = self._write_outputs(study_uid, items)
        self._record(study_id, study_uid, items, written, failures)
        self._count(items)

    def _count(self, items: Sequence[InstanceWork]) -> None:
        """Metrics of a recorded study: predictions and rejections."""
        if self.metrics is None:
            return
        for item in items:
            if item.prediction:
                self.metrics.classified(
                    item.prediction["label"],
                    item.prediction["top_probability"],
                    item.prediction["inference_ms"],
                    item.prediction["gradcam_ms"],
                    body_part_mismatch=item.prediction["body_part_mismatch"],
                )
            else:
                gate = item.gate or GateResult(False, ("not processed",))
                self.metrics.rejected(gate.reasons)


def read_and_gate(
    path: Path, gate: GateConfig, spec: PreprocessSpec
) -> tuple[Dataset | None, GateResult]:
    """Read a stored instance and run the gate on it (decoding its pixels if the
    metadata passes): what the pipeline does to each instance before inference.

    A file that cannot be read is a rejection with a reason, not an error: whatever a
    sender managed to get stored, the study it belongs to is still processed.
    """
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        # A damaged file makes pydicom's parser fail in many ways (OSError, EOFError,
        # BytesLengthException, struct.error, KeyError, ...): all mean the same here.
        detail = f"{type(error).__name__}: {error}"
        return None, GateResult(False, (UndecodablePixels(detail).reason,))
    return dataset, evaluate(dataset, gate, partial(prepare, spec=spec))


def _audit(
    session: Session, kind: str, detail: dict[str, Any], study_uid: str, now: datetime
) -> None:
    session.add(AuditEvent(at=now, kind=kind, study_uid=study_uid, detail=detail))


def load_classifier(config: Config) -> Classifier:
    """The process's one model, from `model.dir` on `model.device`."""
    return Classifier.from_dir(
        Path(config.model.dir),
        device=config.model.device,
        batch_size=config.model.batch_size,
        threads=config.model.threads,
    )


def _stop_worker(worker: Any) -> None:
    if not worker.stop(FORWARD_STOP_TIMEOUT_S):
        log.warning("forwarding still busy after %g s at shutdown", FORWARD_STOP_TIMEOUT_S)


def make_processor(
    config: Config,
    sessions: sessionmaker[Session],
    spool: Any,
    worker_id: str,
    metrics: GatewayMetrics | None = None,
) -> Any:
    """What `radgate serve` runs: the pipeline, with routing and forwarding behind it.

    Start-up recovery first (forward jobs left in progress by a killed process go back
    to pending; processed studies that never got routed are routed), then a forwarding
    thread that runs due jobs every second and at once when a study has been routed.
    """
    from gateway.forward import Forwarder
    from gateway.routing import create_forward_jobs, route_unrouted
    from gateway.scheduler import ProcessingWorker
    from gateway.service import Processor

    classifier = load_classifier(config)
    forwarder = Forwarder(config, sessions, metrics=metrics)
    requeued = forwarder.requeue_in_progress()
    rerouted = route_unrouted(sessions, config)
    if requeued or rerouted:
        log.info(
            "recovered forwarding: %d job(s) requeued, %d stud(ies) routed",
            len(requeued),
            len(rerouted),
        )
    delivery = ProcessingWorker(forwarder.run_due, idle_interval_s=FORWARD_INTERVAL_S)

    def routed(session: Session, study_id: int) -> None:
        if create_forward_jobs(session, config, study_id):
            delivery.wake()

    pipeline = Pipeline(
        config,
        sessions,
        classifier,
        worker_id=worker_id,
        on_processed=routed,
        spool=spool,
        metrics=metrics,
    )
    delivery.start()
    return Processor(
        process_ready=pipeline.process_ready,
        model_id=classifier.loaded.model_id,
        device=str(classifier.device),
        close=partial(_stop_worker, delivery),
    )
