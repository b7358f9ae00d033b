"""The work-state transitions of the gateway, each one short transaction.

Every function here that takes a `Session` runs exactly one transaction in it
(``with session.begin()``): it commits when the function returns and rolls back if
it raises, so pass a session that has no transaction open. `claim_study` takes a
`sessionmaker` because it may need more than one attempt.

Study life cycle::

    receiving --(last delivering association released, quiet period over)--> ready
    ready --(claim_study)--> processing --(finish_study)--> processed
                                        \\--(fail_study)--> failed
    processing --(worker died: reset_processing / reclaim_stale)--> ready
    ready | processed | failed --(a new instance arrives)--> receiving

No DICOM networking here: the receiver and the pipeline call these with plain values.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from db.models import (
    Association,
    AssociationOutcome,
    AssociationStudy,
    AuditEvent,
    Instance,
    InstanceState,
    Study,
    StudyState,
    utcnow,
)

# A study claimed this many times without finishing (its worker died each time) is
# failed rather than handed out again.
DEFAULT_MAX_CLAIMS = 3

# Audit event kinds and the IHE ATNA (DICOM PS3.15 A.5) event ids their details carry.
ASSOCIATION_EVENT = "association"
SECURITY_EVENT = "security"
ATNA_INSTANCES_TRANSFERRED = "110104"
ATNA_SECURITY_ALERT = "110113"


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receiver knows about one stored SOP instance."""

    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    series_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    calling_aet: str | None = None
    association_id: int | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None


@dataclass(frozen=True)
class RecordResult:
    """Outcome of `record_instance`.

    For a duplicate, `instance_id`, `spool_path` and `sha256` are those of the copy
    stored first (the new file can be deleted) and `same_content` says whether the
    two were byte-identical.
    """

    duplicate: bool
    instance_id: int
    study_id: int
    spool_path: str
    sha256: str
    same_content: bool = True


def _transaction(session: Session) -> SessionTransaction:
    """The one transaction a work function runs; refuses a session already in one."""
    if session.in_transaction():
        raise InvalidRequestError(
            "db.work functions run their own transaction: pass a session with none open"
            " (commit, roll back or close it first)"
        )
    return session.begin()


def new_worker_id() -> str:
    """An id for this process's claims: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def add_audit_event(
    session: Session,
    kind: str,
    detail: dict[str, Any] | None = None,
    *,
    study_uid: str | None = None,
    now: datetime | None = None,
) -> int:
    """Append one audit event (its own transaction); returns its id."""
    with _transaction(session):
        return _add_audit_event(session, kind, detail, study_uid=study_uid, now=now)


def _add_audit_event(
    session: Session,
    kind: str,
    detail: dict[str, Any] | None,
    *,
    study_uid: str | None = None,
    now: datetime | None = None,
) -> int:
    event = AuditEvent(at=now or utcnow(), kind=kind, study_uid=study_uid, detail=detail or {})
    session.add(event)
    session.flush()
    return event.id


def open_association(
    session: Session,
    *,
    calling_aet: str,
    called_aet: str,
    peer_host: str,
    peer_port: int | None,
    now: datetime | None = None,
) -> int:
    """Record an accepted association; returns its id for `record_instance`."""
    with _transaction(session):
        association = Association(
            calling_aet=calling_aet,
            called_aet=called_aet,
            peer_host=peer_host,
            peer_port=peer_port,
            started_at=now or utcnow(),
        )
        session.add(association)
        session.flush()
        return association.id


def record_rejected_association(
    session: Session,
    *,
    calling_aet: str,
    called_aet: str,
    peer_host: str,
    peer_port: int | None,
    reason: str,
    now: datetime | None = None,
) -> int:
    """Record an association refused at negotiation, with a `security` audit event."""
    moment = now or utcnow()
    with _transaction(session):
        association = Association(
            calling_aet=calling_aet,
            called_aet=called_aet,
            peer_host=peer_host,
            peer_port=peer_port,
            started_at=moment,
            ended_at=moment,
            outcome=AssociationOutcome.REJECTED,
            reason=reason,
        )
        session.add(association)
        session.flush()
        _add_audit_event(
            session,
            SECURITY_EVENT,
            {
                "event": "association rejected",
                "atna_event_id": ATNA_SECURITY_ALERT,
                "association_id": association.id,
                "calling_aet": calling_aet,
                "called_aet": called_aet,
                "peer_host": peer_host,
                "reason": reason,
            },
            now=moment,
        )
        return association.id


def close_association(
    session: Session,
    association_id: int,
    outcome: AssociationOutcome | str,
    reason: str | None = None,
    *,
    now: datetime | None = None,
) -> list[int]:
    """End an association; returns the ids of the studies it delivered to.

    `released` marks those studies released now (the quiet period then decides
    readiness); `aborted` clears their release mark: an aborted delivery may be
    incomplete, so it never makes a study ready early.
    """
    outcome = AssociationOutcome(outcome)
    moment = now or utcnow()
    with _transaction(session):
        closed = session.execute(
            update(Association)
            .where(Association.id == association_id)
            .values(
                ended_at=moment,
                outcome=outcome,
                reason=reason,
                instances_received=_instances_received(),
            )
            .execution_options(synchronize_session=False)
        )
        if _rowcount(closed) != 1:
            raise LookupError(f"no association {association_id}")
        study_ids = list(
            session.scalars(
                select(AssociationStudy.study_id).where(
                    AssociationStudy.association_id == association_id
                )
            )
        )
        if study_ids:
            released_at = moment if outcome is AssociationOutcome.RELEASED else None
            session.execute(
                update(Study).where(Study.id.in_(study_ids)).values(released_at=released_at)
            )
        _audit_associations(session, [association_id], moment)
        return study_ids


def _audit_associations(session: Session, association_ids: list[int], moment: datetime) -> None:
    """One `association` audit event per ended association (ATNA 110104, DICOM Instances
    Transferred, as the receiving side): peer, instances and outcome."""
    rows = session.execute(
        select(Association)
        .where(Association.id.in_(association_ids))
        .order_by(Association.id)
        .execution_options(populate_existing=True)
    ).scalars()
    for association in rows:
        _add_audit_event(
            session,
            ASSOCIATION_EVENT,
            {
                "event": "association ended",
                "atna_event_id": ATNA_INSTANCES_TRANSFERRED,
                "association_id": association.id,
                "calling_aet": association.calling_aet,
                "called_aet": association.called_aet,
                "peer_host": association.peer_host,
                "peer_port": association.peer_port,
                "instances": association.instances_received,
                "outcome": None if association.outcome is None else association.outcome.value,
                "reason": association.reason,
                "started_at": association.started_at.isoformat(timespec="milliseconds"),
            },
            now=moment,
        )


def abort_open_associations(
    session: Session, reason: str, *, now: datetime | None = None
) -> list[int]:
    """Close every association still open as aborted (at start-up: the process died).

    Only for a gateway that is the single receiver on its database.
    """
    moment = now or utcnow()
    with _transaction(session):
        open_ids = list(
            session.scalars(select(Association.id).where(Association.ended_at.is_(None)))
        )
        if not open_ids:
            return []
        session.execute(
            update(Association)
            .where(Association.id.in_(open_ids))
            .values(
                ended_at=moment,
                outcome=AssociationOutcome.ABORTED,
                reason=reason,
                instances_received=_instances_received(),
            )
        )
        delivered_to = select(AssociationStudy.study_id).where(
            AssociationStudy.association_id.in_(open_ids)
        )
        session.execute(update(Study).where(Study.id.in_(delivered_to)).values(released_at=None))
        _audit_associations(session, open_ids, moment)
        return open_ids


def record_instance(
    session: Session, received: ReceivedInstance, *, now: datetime | None = None
) -> RecordResult:
    """Record a stored instance and its study; a known SOP Instance UID is a duplicate.

    New instance: inserts the row, creates the study or bumps its
    `last_received_at`, clears its release mark (delivery is going on), and moves a
    `ready`, `processed` or `failed` study back to `receiving` so the new instance
    gets processed. A study in `processing` keeps its state: `finish_study` sees the
    unprocessed instance and sends it back to `receiving`.

    Duplicate: no new instance row and no state change; the association is still
    linked to the study, so a resend that releases normally makes the study ready.
    """
    try:
        return _record_instance(session, received, now or utcnow())
    except IntegrityError:
        # Another gateway process (PostgreSQL) inserted the same study or instance
        # between our look-up and our insert: the second try sees its row.
        return _record_instance(session, received, now or utcnow())


# The receive path's statements, built once: `record_instance` runs once per
# C-STORE before the peer gets its response, so it uses Core statements with bound
# parameters instead of the unit of work.
_INSTANCES = cast(Table, Instance.__table__)
_STUDIES = cast(Table, Study.__table__)
_LINKS = cast(Table, AssociationStudy.__table__)
_FIND_INSTANCE = select(
    _INSTANCES.c.id, _INSTANCES.c.study_id, _INSTANCES.c.spool_path, _INSTANCES.c.sha256
).where(_INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid"))
_FIND_STUDY = (
    select(_STUDIES.c.id, _STUDIES.c.last_received_at, _STUDIES.c.state)
    .where(_STUDIES.c.study_uid == bindparam("study_uid"))
    .with_for_update()
)
_INSERT_STUDY = insert(_STUDIES).returning(_STUDIES.c.id)
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_COUNT_LINK = (
    update(_LINKS)
    .where(
        _LINKS.c.association_id == bindparam("link_association_id"),
        _LINKS.c.study_id == bindparam("link_study_id"),
    )
    .values(instances=_LINKS.c.instances + 1)
)
_INSERT_LINK = insert(_LINKS)
# A new instance for a study in one of these states must be processed too.
_REOPENED_BY_NEW_INSTANCE = (StudyState.READY, StudyState.PROCESSED, StudyState.FAILED)


def _record_instance(
    session: Session, received: ReceivedInstance, moment: datetime
) -> RecordResult:
    with _transaction(session):
        connection = session.connection()
        existing = connection.execute(
            _FIND_INSTANCE, {"sop_instance_uid": received.sop_instance_uid}
        ).first()
        if existing is not None:
            _link_association(connection, received.association_id, existing.study_id)
            return RecordResult(
                duplicate=True,
                instance_id=existing.id,
                study_id=existing.study_id,
                spool_path=existing.spool_path,
                sha256=existing.sha256,
                same_content=existing.sha256 == received.sha256,
            )

        study = connection.execute(_FIND_STUDY, {"study_uid": received.study_uid}).first()
        if study is None:
            study_id: int = connection.execute(
                _INSERT_STUDY,
                {
                    "study_uid": received.study_uid,
                    "patient_id": received.patient_id,
                    "patient_name": received.patient_name,
                    "accession_number": received.accession_number,
                    "study_date": received.study_date,
                    "calling_aet": received.calling_aet,
                    "first_received_at": moment,
                    "last_received_at": moment,
                    "state": StudyState.RECEIVING,
                },
            ).scalar_one()
        else:
            study_id = study.id
            changes: dict[str, Any] = {
                "last_received_at": max(study.last_received_at, moment),
                "released_at": None,
            }
            if study.state in _REOPENED_BY_NEW_INSTANCE:
                changes.update(state=StudyState.RECEIVING, error=None)
            connection.execute(update(_STUDIES).where(_STUDIES.c.id == study_id).values(changes))

        instance_id: int = connection.execute(
            _INSERT_INSTANCE,
            {
                "study_id": study_id,
                "sop_instance_uid": received.sop_instance_uid,
                "sop_class_uid": received.sop_class_uid,
                "series_uid": received.series_uid,
                "modality": received.modality,
                "body_part": received.body_part,
                "transfer_syntax_uid": received.transfer_syntax_uid,
                "spool_path": received.spool_path,
                "sha256": received.sha256,
                "size_bytes": received.size_bytes,
                "calling_aet": received.calling_aet,
                "association_id": received.association_id,
                "received_at": moment,
                "state": InstanceState.RECEIVED,
            },
        ).scalar_one()
        _link_association(connection, received.association_id, study_id)
        return RecordResult(
            duplicate=False,
            instance_id=instance_id,
            study_id=study_id,
            spool_path=received.spool_path,
            sha256=received.sha256,
        )


def _link_association(connection: Connection, association_id: int | None, study_id: int) -> None:
    """Count the store against (association, study); `close_association` totals the counts."""
    if association_id is None:
        return
    counted = connection.execute(
        _COUNT_LINK, {"link_association_id": association_id, "link_study_id": study_id}
    )
    if _rowcount(counted) == 0:
        connection.execute(
            _INSERT_LINK, {"association_id": association_id, "study_id": study_id, "instances": 1}
        )


def _instances_received() -> Any:
    """SQL: the stores counted for an association (its `instances_received`)."""
    return (
        select(func.coalesce(func.sum(AssociationStudy.instances), 0))
        .where(AssociationStudy.association_id == Association.id)
        .scalar_subquery()
    )


def _readiness(now: datetime, quiet_period_s: float, unreleased_timeout_s: float | None) -> Any:
    """SQL condition: a `receiving` study whose delivery is over.

    Normal case: the last association that delivered to it released normally, no
    association that delivered to it is still open, and `quiet_period_s` passed
    since its last instance. Fallback (`unreleased_timeout_s`): a study whose
    delivery never ended in a release (the sender aborted and did not come back)
    is processed anyway once nothing arrived for that long, so nothing received is
    left unprocessed.
    """
    open_delivery = exists().where(
        AssociationStudy.study_id == Study.id,
        AssociationStudy.association_id == Association.id,
        Association.ended_at.is_(None),
    )
    released = and_(
        Study.released_at.is_not(None),
        Study.last_received_at <= now - timedelta(seconds=quiet_period_s),
        ~open_delivery,
    )
    condition = released
    if unreleased_timeout_s is not None:
        condition = or_(
            released, Study.last_received_at <= now - timedelta(seconds=unreleased_timeout_s)
        )
    return and_(Study.state == StudyState.RECEIVING, condition)


def _ready_ids(
    session: Session, now: datetime, quiet_period_s: float, unreleased_timeout_s: float | None
) -> list[int]:
    return list(
        session.scalars(
            select(Study.id)
            .where(_readiness(now, quiet_period_s, unreleased_timeout_s))
            .order_by(Study.last_received_at, Study.id)
        )
    )


def ready_study_ids(
    session: Session,
    now: datetime,
    quiet_period_s: float,
    unreleased_timeout_s: float | None = None,
) -> list[int]:
    """Ids of `receiving` studies whose delivery is over (see `_readiness`), oldest first."""
    with _transaction(session):
        return _ready_ids(session, now, quiet_period_s, unreleased_timeout_s)


def mark_ready(
    session: Session,
    now: datetime,
    quiet_period_s: float,
    unreleased_timeout_s: float | None = None,
) -> list[int]:
    """Move every study whose delivery is over from `receiving` to `ready`; returns their ids."""
    with _transaction(session):
        study_ids = _ready_ids(session, now, quiet_period_s, unreleased_timeout_s)
        if study_ids:
            session.execute(
                update(Study)
                .where(Study.id.in_(study_ids), Study.state == StudyState.RECEIVING)
                .values(state=StudyState.READY)
            )
        return study_ids


def claim_study(
    session_factory: sessionmaker[Session],
    worker_id: str,
    *,
    now: datetime | None = None,
    attempts: int = 3,
) -> int | None:
    """Move one `ready` study (oldest first) to `processing` for `worker_id`; None if none.

    The UPDATE is guarded by ``state = 'ready'`` and its row count checked, so two
    workers can never both claim a study: on SQLite the transaction holds the write
    lock from BEGIN IMMEDIATE; on PostgreSQL the candidate row is locked with
    SKIP LOCKED and a lost race is retried with the next candidate.
    """
    for _ in range(attempts):
        with session_factory() as session, _transaction(session):
            candidate = session.scalars(
                select(Study.id)
                .where(Study.state == StudyState.READY)
                .order_by(Study.last_received_at, Study.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            claimed = session.execute(
                update(Study)
                .where(Study.id == candidate, Study.state == StudyState.READY)
                .values(
                    state=StudyState.PROCESSING,
                    claimed_by=worker_id,
                    claimed_at=now or utcnow(),
                    attempts=Study.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            )
            if _rowcount(claimed) == 1:
                return candidate
    return None


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def finish_study(
    session: Session, study_id: int, worker_id: str, *, now: datetime | None = None
) -> StudyState:
    """End `worker_id`'s processing of a study; returns the study's new state.

    `processed`, unless an instance arrived while it was being processed (one
    still in state `received`): then back to `receiving`, and the study becomes
    ready again once that delivery is over. A worker whose claim was taken away
    (reclaimed as stale) gets `LookupError` and must not record anything more.
    """
    moment = now or utcnow()
    with _transaction(session):
        study = _claimed_study(session, study_id, worker_id)
        pending = session.scalar(
            select(
                exists().where(
                    Instance.study_id == study_id, Instance.state == InstanceState.RECEIVED
                )
            )
        )
        study.claimed_by = None
        study.claimed_at = None
        if pending:
            study.state = StudyState.RECEIVING
        else:
            study.state = StudyState.PROCESSED
            study.processed_at = moment
            study.error = None
            study.attempts = 0
        return study.state


def fail_study(
    session: Session,
    study_id: int,
    worker_id: str,
    error: str,
    *,
    now: datetime | None = None,
) -> None:
    """Mark a study `failed` with `error` (kept for the audit view) and an `error` event."""
    moment = now or utcnow()
    with _transaction(session):
        study = _claimed_study(session, study_id, worker_id)
        study.state = StudyState.FAILED
        study.error = error
        study.claimed_by = None
        study.claimed_at = None
        study.processed_at = moment
        _add_audit_event(
            session,
            "error",
            {"event": "study failed", "error": error, "worker_id": worker_id},
            study_uid=study.study_uid,
            now=moment,
        )


def _claimed_study(session: Session, study_id: int, worker_id: str) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study {study_id}")
    if study.state is not StudyState.PROCESSING or study.claimed_by != worker_id:
        raise LookupError(
            f"study {study_id} is {study.state.value} and claimed by {study.claimed_by!r},"
            f" not by {worker_id!r}"
        )
    return study


def reclaim_stale(
    session: Session,
    now: datetime,
    older_than_s: float,
    *,
    max_claims: int = DEFAULT_MAX_CLAIMS,
) -> list[int]:
    """Studies claimed more than `older_than_s` ago and not finished go back to `ready`.

    For gateways sharing one database, where a dead worker's claims cannot be told
    apart from a slow one's except by age: choose `older_than_s` well above the
    longest processing time. Returns the ids released (see `_release_claims`).
    """
    cutoff = now - timedelta(seconds=older_than_s)
    return _release_claims(
        session,
        and_(Study.state == StudyState.PROCESSING, Study.claimed_at < cutoff),
        now,
        max_claims,
        f"claim older than {older_than_s:g}s",
    )


def reset_processing(
    session: Session,
    worker_id: str,
    *,
    now: datetime | None = None,
    max_claims: int = DEFAULT_MAX_CLAIMS,
) -> list[int]:
    """At start-up: every study `processing` under another worker id goes back to `ready`.

    Those claims belong to earlier runs of the gateway that were killed. Only for a
    gateway that is the single processor on its database (the SQLite default);
    several processes sharing a database use `reclaim_stale` instead. A study
    claimed `max_claims` times already is failed instead: it keeps killing its
    worker and would do so again.
    """
    return _release_claims(
        session,
        and_(
            Study.state == StudyState.PROCESSING,
            or_(Study.claimed_by.is_(None), Study.claimed_by != worker_id),
        ),
        now or utcnow(),
        max_claims,
        "worker stopped",
    )


def _release_claims(
    session: Session, condition: Any, now: datetime, max_claims: int, why: str
) -> list[int]:
    with _transaction(session):
        studies: Sequence[Study] = session.scalars(select(Study).where(condition)).all()
        released: list[int] = []
        for study in studies:
            previous_worker = study.claimed_by
            study.claimed_by = None
            study.claimed_at = None
            if study.attempts >= max_claims:
                study.state = StudyState.FAILED
                study.error = f"abandoned after {study.attempts} claims ({why})"
                study.processed_at = now
                _add_audit_event(
                    session,
                    "error",
                    {
                        "event": "study abandoned",
                        "error": study.error,
                        "worker_id": previous_worker,
                    },
                    study_uid=study.study_uid,
                    now=now,
                )
            else:
                study.state = StudyState.READY
                released.append(study.id)
                _add_audit_event(
                    session,
                    "recovery",
                    {"event": "claim released", "reason": why, "worker_id": previous_worker},
                    study_uid=study.study_uid,
                    now=now,
                )
        return released
