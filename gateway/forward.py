"""Forwarding: a C-STORE SCU that delivers forward jobs, with retries and a dead letter.

A forward job (one study to one destination, made by `gateway.routing`) goes through

    pending --(claimed by run_due)--> in_progress --> delivered
                                                  \\-> pending (failed attempt, retried
                                                  |    after the destination's backoff)
                                                  \\-> dead (max_attempts used up, or a
                                                       refusal that will never succeed)
    in_progress --(the process was killed: requeue_in_progress)--> pending
    dead --(radgate retry)--> pending

What is sent, per the job's `send` list: `originals` (the RADGATE-tagged copy when the
pipeline made one, else the file as received), `gradcam` (the Grad-CAM Secondary
Captures) and `report` (the result SR). An instance in `forwarded_instances` for the job
was confirmed delivered and is never sent again; each confirmation is committed as soon
as its C-STORE response arrives, so a process killed mid-job resends at most the one
instance that was in flight.

One association per job (more only when the SOP classes need over 128 presentation
contexts). For each SOP class, the file's own transfer syntax is proposed in a context
of its own and Explicit plus Implicit VR Little Endian in another; a compressed file
whose syntax the destination refuses is decompressed and sent uncompressed.

Outcome of each C-STORE status:

* Success and warnings (0xB000 coercion, 0xB006 elements discarded, 0xB007 data set
  does not match SOP class, and the other warning codes): delivered.
* 0xA7xx out of resources, 0x0213 resource limitation, other failures, no response
  (timeout) or an abort: a failed attempt. The association is released (the destination
  is in trouble: it is not hammered with the rest) and the job retried after
  ``destination.backoff_for(attempts)``; after `max_attempts` it is dead.
* Refusals that say the instance itself will never be accepted: 0xA9xx (data set does
  not match SOP class), 0xCxxx (cannot understand), 0x0122 (SOP class not supported),
  0x0124 (not authorised), a SOP class the destination accepted no presentation context
  for, and a file that cannot be read or decompressed. The rest of the job is still
  sent in the same association (one bad file does not hold back the others); the job
  then ends dead with `permanent_failure`, naming the refused instances. The exception
  is 0xC211: pynetdicom-based SCPs answer it whenever their own handler raised (a full
  disk, a locked database), so it is retried like an out-of-resources failure.
* Association rejected permanently (result 1: e.g. called or calling AE title not
  recognised, or DCMTK ``storescp --refuse``): dead at once with `permanent_failure`.
  Rejected transiently (result 2: congestion, too many associations), no connection,
  or no association response: a failed attempt.

Every attempt writes a `forward` audit event in the spirit of IHE ATNA event 110104
(DICOM Instances Transferred): destination, calling and called AE titles, the instances
delivered, the outcome and the reason.
"""

from __future__ import annotations

import argparse
import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from db.models import (
    AuditEvent,
    ForwardedInstance,
    ForwardJob,
    ForwardJobState,
    Instance,
    InstanceState,
    Output,
    OutputKind,
    Study,
    utcnow,
)
from db.session import make_engine, migrate, session_factory
from gateway.config import Config, Destination, load_config
from gateway.metrics import GatewayMetrics
from gateway.security import TLSSetupError, client_tls_context
from inference.errors import RadgateError

log = logging.getLogger(__name__)

# --- C-STORE statuses (PS3.4 B.2.3, PS3.7 C) ----------------------------------------------

STATUS_SUCCESS_CODE = 0x0000
# Warnings: the instance was stored, with a caveat.
STATUS_WARNING_COERCION = 0xB000
STATUS_WARNING_ELEMENTS_DISCARDED = 0xB006
STATUS_WARNING_DATASET_MISMATCH = 0xB007
# Failure classes, by the high byte (or nibble) of the status.
OUT_OF_RESOURCES_CLASS = 0xA7  # 0xA7xx: transient
DATASET_MISMATCH_CLASS = 0xA9  # 0xA9xx: permanent
CANNOT_UNDERSTAND_NIBBLE = 0xC  # 0xCxxx: permanent, except the one below
# pynetdicom SCPs answer this when their handler raised: says nothing about the data.
STATUS_HANDLER_EXCEPTION = 0xC211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_NOT_AUTHORISED = 0x0124
PERMANENT_GENERAL_STATUSES = frozenset({STATUS_SOP_CLASS_NOT_SUPPORTED, STATUS_NOT_AUTHORISED})

# A-ASSOCIATE-RJ result (PS3.8 9.3.4).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02

# PS3.8 9.3.2.2: at most 128 presentation contexts per association (odd ids 1..255).
MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

FORWARD_EVENT = "forward"
ATNA_INSTANCES_TRANSFERRED = "110104"


class StatusOutcome(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"


def classify_status(status: int) -> StatusOutcome:
    """What a C-STORE response status means for the job (see the module docstring)."""
    category = code_to_category(status)
    if status == STATUS_SUCCESS_CODE or category in (STATUS_SUCCESS, STATUS_WARNING):
        return StatusOutcome.DELIVERED
    if status == STATUS_HANDLER_EXCEPTION:
        return StatusOutcome.RETRY
    if (
        status >> 8 == DATASET_MISMATCH_CLASS
        or status >> 12 == CANNOT_UNDERSTAND_NIBBLE
        or status in PERMANENT_GENERAL_STATUSES
    ):
        return StatusOutcome.PERMANENT
    return StatusOutcome.RETRY


def status_text(status: int) -> str:
    return f"0x{status:04X} ({code_to_category(status).lower()})"


# --- what to send ------------------------------------------------------------------------


@dataclass(frozen=True)
class SendItem:
    """One file to C-STORE."""

    kind: str  # originals | gradcam | report
    sop_instance_uid: str
    sop_class_uid: str
    path: Path


_OUTPUT_KINDS = {"gradcam": OutputKind.GRADCAM_SC, "report": OutputKind.REPORT_SR}


def items_to_send(
    session: Session,
    config: Config,
    study_id: int,
    send: Sequence[str],
    skip: Iterable[str] = (),
) -> list[SendItem]:
    """The files a job with this `send` list delivers, originals first, the report last;
    SOP Instance UIDs in `skip` (already delivered) left out. Reads in the caller's
    session; only processed instances count (one still `received` goes once processed).
    """
    spool = Path(config.storage.spool_dir)
    skipped = set(skip)
    items: list[SendItem] = []
    outputs = list(
        session.scalars(select(Output).where(Output.study_id == study_id).order_by(Output.id))
    )
    if "originals" in send:
        tagged = {
            output.instance_id: output
            for output in outputs
            if output.kind is OutputKind.TAGGED_ORIGINAL and output.instance_id is not None
        }
        instances = session.scalars(
            select(Instance)
            .where(Instance.study_id == study_id, Instance.state != InstanceState.RECEIVED)
            .order_by(Instance.received_at, Instance.id)
        )
        for instance in instances:
            copy = tagged.get(instance.id)
            relative = copy.spool_path if copy is not None else instance.spool_path
            items.append(
                SendItem(
                    "originals",
                    instance.sop_instance_uid,
                    instance.sop_class_uid,
                    spool / relative,
                )
            )
    for kind in ("gradcam", "report"):
        if kind in send:
            items.extend(
                SendItem(
                    kind, output.sop_instance_uid, output.sop_class_uid, spool / output.spool_path
                )
                for output in outputs
                if output.kind is _OUTPUT_KINDS[kind]
            )
    return [item for item in items if item.sop_instance_uid not in skipped]


# --- one attempt -------------------------------------------------------------------------


@dataclass
class AttemptResult:
    """What one attempt did; `error` (transient) and `fatal` (permanent) are exclusive."""

    delivered: list[str] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # permanent, per instance
    decompressed: list[str] = field(default_factory=list)
    error: str | None = None  # failed attempt: retry after the backoff
    fatal: str | None = None  # will never succeed: dead at once


@dataclass(frozen=True)
class _Prepared:
    item: SendItem
    transfer_syntax: UID


class AttemptFailed(Exception):
    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def proposed_contexts(items: Sequence[_Prepared]) -> list[list[PresentationContext]]:
    """Presentation contexts for `items`, in batches of at most 128 (one association each).

    Per SOP class: one context per non-uncompressed transfer syntax among its files
    (alone, so the destination's answer about it is unambiguous), plus one with Explicit
    and Implicit VR Little Endian to fall back on.
    """
    by_class: dict[str, list[UID]] = {}
    for prepared in items:
        syntaxes = by_class.setdefault(prepared.item.sop_class_uid, [])
        if (
            prepared.transfer_syntax not in UNCOMPRESSED
            and prepared.transfer_syntax not in syntaxes
        ):
            syntaxes.append(prepared.transfer_syntax)
    batches: list[list[PresentationContext]] = [[]]
    for sop_class, syntaxes in by_class.items():
        contexts = [build_context(sop_class, [syntax]) for syntax in syntaxes[: MAX_CONTEXTS - 1]]
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return [batch for batch in batches if batch]


def _batch_items(
    items: Sequence[_Prepared], batches: Sequence[list[PresentationContext]]
) -> list[list[_Prepared]]:
    classes = [{context.abstract_syntax for context in batch} for batch in batches]
    return [[p for p in items if p.item.sop_class_uid in wanted] for wanted in classes]


def _rejection_text(assoc: Association, destination: Destination) -> tuple[str, bool]:
    primitive = assoc.acceptor.primitive
    if primitive is None:
        return f"association rejected by {destination.ae_title}", False
    permanent = primitive.result == REJECTED_PERMANENT
    kind = "permanently" if permanent else "transiently"
    return (
        f"association rejected {kind} by {destination.ae_title} at"
        f" {destination.host}:{destination.port}: {primitive.reason_str}"
        f" (source: {primitive.source_str})",
        permanent,
    )


class _Sender:
    """Sends prepared items to one destination over one association per context batch."""

    def __init__(
        self, config: Config, destination: Destination, record: Callable[[str, int], None]
    ) -> None:
        self.config = config
        self.destination = destination
        # Called with (sop_instance_uid, status) right after each confirmed delivery.
        self.record = record

    def _ae(self) -> AE:
        ae = AE(ae_title=self.config.ae.title)
        timeout = self.destination.timeout_s
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        return ae

    def send(self, items: Sequence[_Prepared], result: AttemptResult) -> None:
        batches = proposed_contexts(items)
        for contexts, batch in zip(batches, _batch_items(items, batches), strict=True):
            self._send_batch(contexts, batch, result)
            if result.error or result.fatal:
                return

    def _open(self, contexts: list[PresentationContext]) -> Association:
        destination = self.destination
        connected: list[bool] = []
        tls_args = None
        if destination.tls is not None:
            try:
                tls_args = client_tls_context(destination)
            except TLSSetupError as error:
                raise AttemptFailed(str(error)) from None
        assoc = self._ae().associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))],
        )
        if assoc.is_established:
            return assoc
        where = f"{destination.host}:{destination.port}"
        if assoc.is_rejected:
            text, permanent = _rejection_text(assoc, destination)
            raise AttemptFailed(text, permanent=permanent)
        if not connected and tls_args is not None:
            raise AttemptFailed(
                f"cannot connect to {where} over TLS (refused, unreachable, no answer within"
                f" {destination.timeout_s:g} s, or the TLS handshake failed: is the"
                f" certificate of {tls_args[1]} signed by the CA in the destination's tls"
                " section, and does the destination accept radgate's certificate?)"
            )
        if not connected:
            raise AttemptFailed(
                f"cannot connect to {where} (refused, unreachable or no answer within"
                f" {destination.timeout_s:g} s)"
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            raise AttemptFailed(
                f"{destination.ae_title} at {where} accepted none of the proposed presentation"
                " contexts (SOP classes and transfer syntaxes)",
                permanent=True,
            )
        raise AttemptFailed(
            f"association with {destination.ae_title} at {where} aborted or not answered within"
            f" {destination.timeout_s:g} s"
        )

    def _send_batch(
        self, contexts: list[PresentationContext], batch: Sequence[_Prepared], result: AttemptResult
    ) -> None:
        try:
            assoc = self._open(contexts)
        except AttemptFailed as failure:
            if failure.permanent:
                result.fatal = failure.reason
            else:
                result.error = failure.reason
            return
        try:
            for prepared in batch:
                if not assoc.is_established:
                    result.error = (
                        f"association with {self.destination.ae_title} ended before"
                        f" {prepared.item.sop_instance_uid} was sent"
                    )
                    return
                if not self._send_one(assoc, prepared, result):
                    return
        finally:
            if assoc.is_established:
                assoc.release()

    def _dataset_for(
        self, assoc: Association, prepared: _Prepared, result: AttemptResult
    ) -> Dataset | None:
        """The dataset to send in a syntax the destination accepted; None if refused."""
        item = prepared.item
        accepted = [
            context.transfer_syntax[0]
            for context in assoc.accepted_contexts
            if context.abstract_syntax == item.sop_class_uid
        ]
        if not accepted:
            result.refused[item.sop_instance_uid] = (
                f"{self.destination.ae_title} accepted no presentation context for SOP class"
                f" {UID(item.sop_class_uid).name}"
            )
            return None
        syntax = prepared.transfer_syntax
        uncompressed = [ts for ts in accepted if ts in UNCOMPRESSED]
        if syntax not in accepted and not uncompressed:
            result.refused[item.sop_instance_uid] = (
                f"{self.destination.ae_title} accepted neither {syntax.name} nor an uncompressed"
                f" transfer syntax for {UID(item.sop_class_uid).name}"
            )
            return None
        try:
            dataset = pydicom.dcmread(item.path)
        except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError) as error:
            result.refused[item.sop_instance_uid] = f"cannot read {item.path}: {error}"
            return None
        if syntax in accepted or syntax in UNCOMPRESSED:
            return dataset
        if not syntax.is_little_endian:
            result.refused[item.sop_instance_uid] = (
                f"{self.destination.ae_title} refused {syntax.name} and a big endian file"
                " cannot be converted"
            )
            return None
        if syntax.is_encapsulated:
            try:
                # pydicom gives a decompressed copy a new SOP Instance UID unless told not to:
                # the destination must get the same instance.
                dataset.decompress(generate_instance_uid=False)
            except Exception as error:  # the pixel data plugins raise many kinds
                result.refused[item.sop_instance_uid] = (
                    f"{self.destination.ae_title} refused {syntax.name} and decompressing"
                    f" failed: {error}"
                )
                return None
            result.decompressed.append(item.sop_instance_uid)
        else:
            # Deflated: the decoded data set is re-encoded as plain little endian.
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return dataset

    def _send_one(self, assoc: Association, prepared: _Prepared, result: AttemptResult) -> bool:
        """C-STORE one item; False when the association must stop (transient failure)."""
        item = prepared.item
        dataset = self._dataset_for(assoc, prepared, result)
        if dataset is None:
            return True
        started = time.monotonic()
        try:
            response = assoc.send_c_store(dataset)
        except ValueError as error:
            result.refused[item.sop_instance_uid] = f"cannot send: {error}"
            return True
        except RuntimeError as error:
            result.error = f"association ended: {error}"
            return False
        if "Status" not in response:
            waited = time.monotonic() - started
            if waited >= self.destination.timeout_s * 0.95:
                result.error = (
                    f"no C-STORE response for {item.sop_instance_uid} within"
                    f" {self.destination.timeout_s:g} s"
                )
            else:
                result.error = (
                    f"association aborted by {self.destination.ae_title} while sending"
                    f" {item.sop_instance_uid}"
                )
            return False
        status = int(response.Status)
        outcome = classify_status(status)
        if outcome is StatusOutcome.DELIVERED:
            self.record(item.sop_instance_uid, status)
            result.delivered.append(item.sop_instance_uid)
            if status != STATUS_SUCCESS_CODE:
                result.warnings[item.sop_instance_uid] = status_text(status)
            return True
        comment = response.get("ErrorComment")
        text = f"C-STORE of {item.sop_instance_uid} failed: {status_text(status)}" + (
            f" {comment}" if comment else ""
        )
        if outcome is StatusOutcome.PERMANENT:
            result.refused[item.sop_instance_uid] = text
            return True
        result.error = text
        return False


# --- the forwarder -----------------------------------------------------------------------


def _transaction(session: Session) -> SessionTransaction:
    if session.in_transaction():
        raise InvalidRequestError(
            "forward functions run their own transaction: pass a session with none open"
        )
    return session.begin()


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


class Forwarder:
    """Delivers due forward jobs; one instance per worker thread or process."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        *,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.metrics = metrics

    # ------------------------------------------------------------------ claiming

    def requeue_in_progress(
        self, *, older_than_s: float | None = None, now: datetime | None = None
    ) -> list[int]:
        """Jobs left `in_progress` by a killed process go back to `pending`, due now.

        At start-up of the only forwarding process, with no argument: every such job.
        Processes sharing a database pass `older_than_s` (well above the longest
        attempt): only jobs whose last sign of life (`updated_at`, touched at each
        delivered instance) is older. Returns their ids.
        """
        moment = now or utcnow()
        condition = ForwardJob.state == ForwardJobState.IN_PROGRESS
        if older_than_s is not None:
            condition = condition & (
                ForwardJob.updated_at < moment - timedelta(seconds=older_than_s)
            )
        with self.sessions() as session, _transaction(session):
            jobs = list(session.scalars(select(ForwardJob).where(condition)))
            for job in jobs:
                job.state = ForwardJobState.PENDING
                job.next_attempt_at = moment
                job.updated_at = moment
                session.add(
                    AuditEvent(
                        at=moment,
                        kind="recovery",
                        study_uid=job.study.study_uid,
                        detail={
                            "event": "forward job requeued",
                            "job_id": job.id,
                            "destination": job.destination,
                            "reason": "left in progress by a stopped process",
                        },
                    )
                )
            return [job.id for job in jobs]

    def claim_due(self, now: datetime | None = None, exclude: Iterable[int] = ()) -> int | None:
        """Move one due pending job (oldest due first) to `in_progress`; its id, or None.

        Guarded UPDATE with its row count checked (and SKIP LOCKED on PostgreSQL), so
        two workers never claim the same job; a lost race tries the next candidate.
        """
        moment = now or utcnow()
        excluded = list(exclude)
        for _ in range(3):
            with self.sessions() as session, _transaction(session):
                query = (
                    select(ForwardJob.id)
                    .where(
                        ForwardJob.state == ForwardJobState.PENDING,
                        (ForwardJob.next_attempt_at.is_(None))
                        | (ForwardJob.next_attempt_at <= moment),
                    )
                    .order_by(ForwardJob.next_attempt_at, ForwardJob.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if excluded:
                    query = query.where(ForwardJob.id.not_in(excluded))
                candidate = session.scalars(query).first()
                if candidate is None:
                    return None
                claimed = session.execute(
                    update(ForwardJob)
                    .where(ForwardJob.id == candidate, ForwardJob.state == ForwardJobState.PENDING)
                    .values(state=ForwardJobState.IN_PROGRESS, updated_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
                if int(claimed.rowcount) == 1:  # type: ignore[attr-defined]
                    return candidate
        return None

    def run_due(self, now: datetime | None = None, limit: int | None = None) -> int:
        """Claim and attempt due jobs until none is left (or `limit`); returns how many.

        A job is attempted at most once per call, even if it is due again at once.
        """
        attempted: list[int] = []
        while limit is None or len(attempted) < limit:
            job_id = self.claim_due(now, exclude=attempted)
            if job_id is None:
                break
            attempted.append(job_id)
            self.attempt(job_id)
        return len(attempted)

    # ------------------------------------------------------------------ one attempt

    def attempt(self, job_id: int) -> ForwardJobState:
        """Send a claimed (`in_progress`) job and record the outcome; returns its new state."""
        try:
            return self._attempt(job_id)
        except Exception as error:  # one job's surprise must not stop the forwarder
            log.exception("forward job %d: attempt failed unexpectedly", job_id)
            return self._finish(job_id, AttemptResult(error=f"{type(error).__name__}: {error}"))

    def _attempt(self, job_id: int) -> ForwardJobState:
        with self.sessions() as session, _transaction(session):
            job = session.get(ForwardJob, job_id)
            if job is None:
                raise LookupError(f"no forward job {job_id}")
            if job.state is not ForwardJobState.IN_PROGRESS:
                raise LookupError(f"forward job {job_id} is {job.state.value}, not claimed")
            delivered = set(
                session.scalars(
                    select(ForwardedInstance.sop_instance_uid).where(
                        ForwardedInstance.job_id == job_id
                    )
                )
            )
            items = items_to_send(session, self.config, job.study_id, job.send, delivered)
            name = job.destination
        try:
            destination = self.config.destination(name)
        except KeyError:
            return self._finish(
                job_id,
                AttemptResult(fatal=f"destination {name!r} is not in the configuration any more"),
            )
        result = AttemptResult()
        prepared: list[_Prepared] = []
        for item in items:
            try:
                meta = read_file_meta_info(item.path)
                prepared.append(_Prepared(item, UID(meta.TransferSyntaxUID)))
            except (
                OSError,
                ValueError,
                EOFError,
                AttributeError,
                pydicom.errors.InvalidDicomError,
            ) as error:
                result.refused[item.sop_instance_uid] = f"cannot read {item.path}: {error}"
        if prepared:
            _Sender(
                self.config, destination, lambda uid, status: self._record(job_id, uid, status)
            ).send(prepared, result)
        return self._finish(job_id, result, destination)

    def _record(self, job_id: int, sop_instance_uid: str, status: int) -> None:
        """Commit one confirmed delivery at once (a kill then loses at most the next one)."""
        moment = utcnow()
        try:
            with self.sessions() as session, _transaction(session):
                session.add(
                    ForwardedInstance(
                        job_id=job_id,
                        sop_instance_uid=sop_instance_uid,
                        delivered_at=moment,
                        status=status,
                    )
                )
                session.execute(
                    update(ForwardJob).where(ForwardJob.id == job_id).values(updated_at=moment)
                )
        except IntegrityError:
            log.info(
                "forward job %d: %s was already recorded as delivered", job_id, sop_instance_uid
            )

    def _finish(
        self, job_id: int, result: AttemptResult, destination: Destination | None = None
    ) -> ForwardJobState:
        moment = utcnow()
        with self.sessions() as session, _transaction(session):
            job = session.get(ForwardJob, job_id)
            if job is None:
                raise LookupError(f"no forward job {job_id}")
            study = session.get(Study, job.study_id)
            assert study is not None
            if job.state is not ForwardJobState.IN_PROGRESS:
                # Requeued under us (requeue_in_progress with older_than_s): its new owner decides.
                log.warning("forward job %d became %s during an attempt", job_id, job.state.value)
                return job.state
            job.attempts += 1
            delivered = set(
                session.scalars(
                    select(ForwardedInstance.sop_instance_uid).where(
                        ForwardedInstance.job_id == job_id
                    )
                )
            )
            remaining = items_to_send(session, self.config, job.study_id, job.send, delivered)
            max_attempts = destination.max_attempts if destination is not None else job.attempts
            outcome: str
            if result.fatal is not None:
                job.state = ForwardJobState.DEAD
                job.permanent_failure = True
                job.last_error = result.fatal
                job.next_attempt_at = None
                outcome = "dead: permanent failure"
            elif result.refused:
                refused = "; ".join(f"{uid}: {why}" for uid, why in result.refused.items())
                job.state = ForwardJobState.DEAD
                job.permanent_failure = True
                job.last_error = f"refused permanently: {refused}" + (
                    f"; also: {result.error}" if result.error else ""
                )
                job.next_attempt_at = None
                outcome = "dead: permanent failure"
            elif result.error is not None:
                if job.attempts >= max_attempts:
                    job.state = ForwardJobState.DEAD
                    job.last_error = f"{result.error} (gave up after {job.attempts} attempts)"
                    job.next_attempt_at = None
                    outcome = "dead: attempts used up"
                else:
                    assert destination is not None
                    job.state = ForwardJobState.PENDING
                    job.last_error = result.error
                    job.next_attempt_at = moment + timedelta(
                        seconds=destination.backoff_for(job.attempts)
                    )
                    outcome = "retry"
            elif remaining:
                # New instances were processed during the attempt: send them next.
                job.state = ForwardJobState.PENDING
                job.next_attempt_at = moment
                outcome = "more to send"
            else:
                job.state = ForwardJobState.DELIVERED
                job.delivered_at = moment
                job.last_error = None
                job.next_attempt_at = None
                outcome = "delivered"
            job.updated_at = moment
            detail: dict[str, Any] = {
                "event": "forward attempt",
                "atna_event_id": ATNA_INSTANCES_TRANSFERRED,
                "job_id": job.id,
                "destination": job.destination,
                "calling_aet": self.config.ae.title,
                "called_aet": destination.ae_title if destination else None,
                "host": destination.host if destination else None,
                "port": destination.port if destination else None,
                "attempt": job.attempts,
                "outcome": outcome,
                "state": job.state.value,
                "instances_sent": len(result.delivered),
                "sop_instance_uids": list(result.delivered),
                "instances_delivered_total": len(delivered),
            }
            if result.warnings:
                detail["warnings"] = result.warnings
            if result.decompressed:
                detail["decompressed"] = list(result.decompressed)
            if result.refused:
                detail["refused"] = result.refused
            if result.error or result.fatal:
                detail["error"] = result.fatal or result.error
            if job.next_attempt_at is not None and outcome == "retry":
                detail["next_attempt_at"] = _iso(job.next_attempt_at)
            session.add(
                AuditEvent(at=moment, kind=FORWARD_EVENT, study_uid=study.study_uid, detail=detail)
            )
            if self.metrics is not None:
                self.metrics.forward_attempt(
                    job.destination,
                    outcome,
                    study.first_received_at if job.state is ForwardJobState.DELIVERED else None,
                )
            level = logging.INFO if job.state is not ForwardJobState.DEAD else logging.WARNING
            log.log(
                level,
                "forward job %d (study %s -> %s) attempt %d: %s, %d instance(s) sent%s",
                job.id,
                study.study_uid,
                job.destination,
                job.attempts,
                outcome,
                len(result.delivered),
                f": {job.last_error}"
                if job.last_error and job.state is not ForwardJobState.DELIVERED
                else "",
            )
            return job.state


# --- requeueing dead letters --------------------------------------------------------------


@dataclass(frozen=True)
class Requeued:
    job_id: int
    study_uid: str
    destination: str
    attempts: int
    last_error: str | None
    permanent_failure: bool


def requeue_dead(
    session: Session,
    *,
    study_uid: str | None = None,
    destination: str | None = None,
    now: datetime | None = None,
    reason: str = "radgate retry",
) -> list[Requeued]:
    """Dead jobs (of one study and/or destination, or all) back to pending, due now, with
    attempts and the permanent flag cleared (last error kept until the next attempt);
    one `forward` audit event per job."""
    moment = now or utcnow()
    with _transaction(session):
        query = (
            select(ForwardJob, Study.study_uid)
            .join(Study, Study.id == ForwardJob.study_id)
            .where(ForwardJob.state == ForwardJobState.DEAD)
            .order_by(ForwardJob.id)
        )
        if study_uid is not None:
            query = query.where(Study.study_uid == study_uid)
        if destination is not None:
            query = query.where(ForwardJob.destination == destination)
        requeued: list[Requeued] = []
        for job, uid in session.execute(query).all():
            requeued.append(
                Requeued(
                    job.id,
                    uid,
                    job.destination,
                    job.attempts,
                    job.last_error,
                    job.permanent_failure,
                )
            )
            job.state = ForwardJobState.PENDING
            job.attempts = 0
            job.permanent_failure = False
            job.next_attempt_at = moment
            job.updated_at = moment
            session.add(
                AuditEvent(
                    at=moment,
                    kind=FORWARD_EVENT,
                    study_uid=uid,
                    detail={
                        "event": "forward job requeued",
                        "job_id": job.id,
                        "destination": job.destination,
                        "previous_attempts": requeued[-1].attempts,
                        "previous_error": requeued[-1].last_error,
                        "reason": reason,
                    },
                )
            )
        return requeued


def retry_command(args: argparse.Namespace) -> int:
    """`radgate retry --config FILE [STUDY_UID | --dead] [--destination NAME]`."""
    if (args.study_uid is None) == (not args.dead):
        raise RadgateError("give either a STUDY_UID or --dead (every dead-lettered job)")
    config = load_config(args.config)
    if args.destination is not None and args.destination not in {
        d.name for d in config.destinations
    }:
        raise RadgateError(f"destination {args.destination!r} is not in {args.config}")
    engine = make_engine(config.storage.database_url, config.storage.busy_timeout_ms)
    try:
        migrate(engine)
        sessions = session_factory(engine)
        if args.study_uid is not None:
            with sessions() as session, session.begin():
                known = session.scalar(select(Study.id).where(Study.study_uid == args.study_uid))
            if known is None:
                raise RadgateError(f"study {args.study_uid}: not found")
        with sessions() as session:
            requeued = requeue_dead(session, study_uid=args.study_uid, destination=args.destination)
    finally:
        engine.dispose()
    if not requeued:
        print(
            "no dead-lettered forward jobs"
            + (f" for study {args.study_uid}" if args.study_uid else "")
        )
        return 0
    for job in requeued:
        flag = "permanent failure, " if job.permanent_failure else ""
        print(
            f"requeued {job.study_uid} -> {job.destination}"
            f" (was dead after {job.attempts} attempt(s), {flag}last error: {job.last_error or '-'})"
        )
    print(f"{len(requeued)} job(s) requeued: a running gateway sends them at its next retry sweep")
    return 0
