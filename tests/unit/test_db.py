"""The database layer on a real SQLite file: schema, settings, and work-state transitions."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text, update
from sqlalchemy.exc import IntegrityError, InvalidRequestError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import work
from db.models import (
    Association,
    AssociationOutcome,
    AuditEvent,
    Base,
    Instance,
    InstanceState,
    Study,
    StudyState,
)
from db.session import (
    alembic_config,
    current_revision,
    make_engine,
    migrate,
    session_factory,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
QUIET_S = 2.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # A folder that does not exist yet: make_engine creates it.
    return tmp_path / "var" / "radgate.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{db_path}", busy_timeout_ms=2000)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def received(sop: str, study: str = "1.2.3", **fields: object) -> work.ReceivedInstance:
    values: dict[str, object] = {
        "study_uid": study,
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "spool_path": f"ab/{sop}.dcm",
        "sha256": "0" * 64,
        "size_bytes": 1234,
        "modality": "DX",
        "calling_aet": "MODALITY",
        "patient_name": "Doe^Jane",
    }
    values.update(fields)
    return work.ReceivedInstance(**values)  # type: ignore[arg-type]


def open_assoc(sessions: sessionmaker[Session], seconds: float = 0) -> int:
    with sessions() as session:
        return work.open_association(
            session,
            calling_aet="MODALITY",
            called_aet="RADGATE",
            peer_host="127.0.0.1",
            peer_port=40000,
            now=at(seconds),
        )


def store(
    sessions: sessionmaker[Session],
    sop: str,
    seconds: float,
    association_id: int | None,
    **kw: Any,
) -> work.RecordResult:
    with sessions() as session:
        return work.record_instance(
            session, received(sop, association_id=association_id, **kw), now=at(seconds)
        )


def close(
    sessions: sessionmaker[Session], association_id: int, outcome: str, seconds: float
) -> None:
    with sessions() as session:
        work.close_association(session, association_id, outcome, now=at(seconds))


def ready_at(
    sessions: sessionmaker[Session], seconds: float, unreleased_timeout_s: float | None = None
) -> list[int]:
    with sessions() as session:
        return work.ready_study_ids(session, at(seconds), QUIET_S, unreleased_timeout_s)


def study_state(sessions: sessionmaker[Session], study_id: int) -> StudyState:
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.state


def classify_all(sessions: sessionmaker[Session]) -> None:
    # What the pipeline does to every instance it handled.
    with sessions() as session:
        session.execute(update(Instance).values(state=InstanceState.CLASSIFIED))
        session.commit()


def make_ready_studies(sessions: sessionmaker[Session], count: int) -> list[int]:
    association_id = open_assoc(sessions)
    ids = [
        store(sessions, f"9.{n}", 0, association_id, study=f"5.{n}").study_id for n in range(count)
    ]
    close(sessions, association_id, "released", 1)
    with sessions() as session:
        assert sorted(work.mark_ready(session, at(10), QUIET_S)) == sorted(ids)
    return ids


# --- schema and settings ---------------------------------------------------------------


def test_migrations_apply_and_match_the_models(engine: Engine) -> None:
    assert current_revision(engine) == "0001"
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def _constraint_lines(engine: Engine) -> dict[str, set[str]]:
    # CREATE statements as SQLite stores them, one line per column or constraint,
    # compared as sets (alembic and create_all order constraints differently).
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT name, sql FROM sqlite_master"
                " WHERE sql IS NOT NULL AND name != 'alembic_version'"
            )
        )
        return {name: {line.strip().rstrip(",") for line in sql.splitlines()} for name, sql in rows}


def test_migrated_schema_has_the_same_constraints_as_the_models(
    engine: Engine, tmp_path: Path
) -> None:
    reference = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    Base.metadata.create_all(reference)
    try:
        assert _constraint_lines(engine) == _constraint_lines(reference)
    finally:
        reference.dispose()


def test_migrate_twice_is_a_no_op_and_downgrade_reverses_it(engine: Engine) -> None:
    migrate(engine)
    assert current_revision(engine) == "0001"
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    migrate(engine)
    assert "studies" in inspect(engine).get_table_names()


def test_sqlite_settings(engine: Engine, db_path: Path) -> None:
    assert db_path.exists()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2000
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_session_holds_the_write_lock_from_its_first_statement(
    sessions: sessionmaker[Session], db_path: Path
) -> None:
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    try:
        with sessions() as session:
            session.execute(select(Study.id)).all()  # a read only, yet BEGIN IMMEDIATE
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # released on session close
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_a_read_only_session_does_not_take_the_write_lock(engine: Engine, db_path: Path) -> None:
    readers = session_factory(engine, read_only=True)
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    try:
        with readers() as session:
            session.execute(select(Study.id)).all()
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()


def test_foreign_keys_are_enforced(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError):
        store(sessions, "1.1", 0, association_id=999)


def test_timestamps_come_back_timezone_aware_utc(sessions: sessionmaker[Session]) -> None:
    eastern = datetime(2026, 1, 1, 7, 0, 0, tzinfo=UTC).astimezone(ZoneInfo("America/New_York"))
    with sessions() as session:
        result = work.record_instance(session, received("1.1"), now=eastern)
    with sessions() as session:
        instance = session.get(Instance, result.instance_id)
        assert instance is not None
        assert instance.received_at == datetime(2026, 1, 1, 7, 0, 0, tzinfo=UTC)
        assert instance.received_at.tzinfo is UTC


def test_a_naive_timestamp_is_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(Exception, match="naive"):
        work.record_instance(session, received("1.1"), now=datetime(2026, 1, 1))


# --- receiving --------------------------------------------------------------------------


def test_a_duplicate_instance_is_stored_once_and_reported(sessions: sessionmaker[Session]) -> None:
    association_id = open_assoc(sessions)
    first = store(sessions, "1.1", 0, association_id)
    second = store(sessions, "1.1", 1, association_id, spool_path="cd/other.dcm")
    changed = store(sessions, "1.1", 2, association_id, sha256="f" * 64)
    close(sessions, association_id, "released", 3)

    assert not first.duplicate
    assert second.duplicate and second.same_content
    assert changed.duplicate and not changed.same_content
    assert second.instance_id == first.instance_id
    assert second.spool_path == "ab/1.1.dcm"  # the copy stored first
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        association = session.get(Association, association_id)
        assert association is not None and association.instances_received == 3


def test_instances_of_one_study_share_a_study_row(sessions: sessionmaker[Session]) -> None:
    association_id = open_assoc(sessions)
    a = store(sessions, "1.1", 0, association_id)
    b = store(sessions, "1.2", 5, association_id)
    c = store(sessions, "2.1", 6, association_id, study="9.9")
    assert a.study_id == b.study_id != c.study_id
    with sessions() as session:
        study = session.get(Study, a.study_id)
        assert study is not None
        assert study.first_received_at == at(0) and study.last_received_at == at(5)
        assert study.patient_name == "Doe^Jane"
        assert study.state is StudyState.RECEIVING


# --- readiness --------------------------------------------------------------------------


def test_a_released_study_is_ready_after_the_quiet_period(sessions: sessionmaker[Session]) -> None:
    association_id = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, association_id).study_id
    assert ready_at(sessions, 10) == []  # association still open
    close(sessions, association_id, "released", 0.5)
    assert ready_at(sessions, 1.9) == []  # quiet period not over
    assert ready_at(sessions, 2.0) == [study_id]


def test_an_aborted_association_does_not_make_a_study_ready(
    sessions: sessionmaker[Session],
) -> None:
    association_id = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, association_id).study_id
    close(sessions, association_id, "aborted", 0.5)
    assert ready_at(sessions, 100) == []
    # ... until nothing arrived for the unreleased timeout: then it is processed anyway.
    assert ready_at(sessions, 299, unreleased_timeout_s=300) == []
    assert ready_at(sessions, 300, unreleased_timeout_s=300) == [study_id]


def test_an_instance_after_the_release_waits_for_its_own_association(
    sessions: sessionmaker[Session],
) -> None:
    first = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, first).study_id
    close(sessions, first, "released", 1)
    second = open_assoc(sessions, 3)
    store(sessions, "1.2", 4, second)
    assert ready_at(sessions, 60) == []  # second association open
    close(sessions, second, "released", 61)
    # The quiet period counts from the last instance (at 4): ready once released.
    assert ready_at(sessions, 61) == [study_id]


def test_readiness_counts_the_quiet_period_from_the_last_instance(
    sessions: sessionmaker[Session],
) -> None:
    association_id = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, association_id).study_id
    store(sessions, "1.2", 10, association_id)
    close(sessions, association_id, "released", 10.5)
    assert ready_at(sessions, 11) == []
    assert ready_at(sessions, 12) == [study_id]


def test_a_new_instance_after_the_release_clears_it(sessions: sessionmaker[Session]) -> None:
    first = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, first).study_id
    close(sessions, first, "released", 1)
    second = open_assoc(sessions, 3)
    store(sessions, "1.2", 4, second)
    close(sessions, second, "aborted", 5)
    # The last delivery was aborted: the earlier release does not count any more.
    assert ready_at(sessions, 100) == []
    third = open_assoc(sessions, 200)
    store(sessions, "1.3", 201, third)
    close(sessions, third, "released", 202)
    assert ready_at(sessions, 203) == [study_id]


def test_another_open_association_delivering_the_study_holds_it_back(
    sessions: sessionmaker[Session],
) -> None:
    first, second = open_assoc(sessions), open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, first).study_id
    store(sessions, "1.2", 1, second)
    close(sessions, first, "released", 2)
    assert ready_at(sessions, 100) == []
    close(sessions, second, "released", 101)
    assert ready_at(sessions, 101) == [study_id]


def test_a_resend_of_duplicates_that_releases_makes_the_study_ready(
    sessions: sessionmaker[Session],
) -> None:
    first = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, first).study_id
    close(sessions, first, "aborted", 1)
    second = open_assoc(sessions, 10)
    assert store(sessions, "1.1", 11, second).duplicate
    close(sessions, second, "released", 12)
    assert ready_at(sessions, 14) == [study_id]


def test_mark_ready_and_a_late_instance_sends_the_study_back_to_receiving(
    sessions: sessionmaker[Session],
) -> None:
    association_id = open_assoc(sessions)
    study_id = store(sessions, "1.1", 0, association_id).study_id
    close(sessions, association_id, "released", 1)
    with sessions() as session:
        assert work.mark_ready(session, at(5), QUIET_S) == [study_id]
    assert study_state(sessions, study_id) is StudyState.READY
    late = open_assoc(sessions, 6)
    store(sessions, "1.2", 7, late)
    assert study_state(sessions, study_id) is StudyState.RECEIVING
    assert work.claim_study(sessions, "worker") is None


def test_abort_open_associations_at_start_up(sessions: sessionmaker[Session]) -> None:
    association_id = open_assoc(sessions)
    store(sessions, "1.1", 0, association_id)
    with sessions() as session:
        assert work.abort_open_associations(session, "gateway restarted", now=at(50)) == [
            association_id
        ]
    with sessions() as session:
        association = session.get(Association, association_id)
        assert association is not None
        assert association.outcome is AssociationOutcome.ABORTED
        assert association.ended_at == at(50)
    assert ready_at(sessions, 100) == []
    assert len(ready_at(sessions, 400, unreleased_timeout_s=300)) == 1


def test_every_ended_association_is_an_audit_event(sessions: sessionmaker[Session]) -> None:
    released = open_assoc(sessions)
    store(sessions, "1.1", 1, released)
    store(sessions, "1.2", 2, released)
    store(sessions, "1.2", 3, released)  # a resend counts as delivered too
    close(sessions, released, "released", 4)
    left_open = open_assoc(sessions, 5)
    store(sessions, "1.3", 6, left_open)
    with sessions() as session:
        work.abort_open_associations(session, "gateway restarted", now=at(50))
    with sessions() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "association").order_by(AuditEvent.id)
        ).all()
    assert [event.at for event in events] == [at(4), at(50)]
    first, second = (event.detail for event in events)
    assert first["association_id"] == released
    assert first["atna_event_id"] == "110104"
    assert (first["calling_aet"], first["peer_host"]) == ("MODALITY", "127.0.0.1")
    assert (first["instances"], first["outcome"], first["reason"]) == (3, "released", None)
    assert (second["association_id"], second["instances"]) == (left_open, 1)
    assert (second["outcome"], second["reason"]) == ("aborted", "gateway restarted")


# --- claiming ---------------------------------------------------------------------------


def test_claim_finish_cycle(sessions: sessionmaker[Session]) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    assert work.claim_study(sessions, "w1", now=at(20)) == study_id
    assert work.claim_study(sessions, "w2", now=at(20)) is None
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        assert (study.state, study.claimed_by, study.claimed_at) == (
            StudyState.PROCESSING,
            "w1",
            at(20),
        )
    with sessions() as session, pytest.raises(LookupError):
        work.finish_study(session, study_id, "w2")
    classify_all(sessions)
    with sessions() as session:
        assert work.finish_study(session, study_id, "w1", now=at(30)) is StudyState.PROCESSED
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        assert study.processed_at == at(30) and study.claimed_by is None


def test_an_instance_arriving_during_processing_sends_the_study_round_again(
    sessions: sessionmaker[Session],
) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    assert work.claim_study(sessions, "w1") == study_id
    classify_all(sessions)
    late = open_assoc(sessions, 20)
    store(sessions, "late.1", 21, late, study="5.0")
    assert study_state(sessions, study_id) is StudyState.PROCESSING  # the worker keeps it
    with sessions() as session:
        assert work.finish_study(session, study_id, "w1") is StudyState.RECEIVING
    close(sessions, late, "released", 22)
    assert ready_at(sessions, 24) == [study_id]


def test_a_new_instance_for_a_processed_study_reopens_it(sessions: sessionmaker[Session]) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    assert work.claim_study(sessions, "w1") == study_id
    classify_all(sessions)
    with sessions() as session:
        work.finish_study(session, study_id, "w1")
    store(sessions, "late.1", 50, None, study="5.0")
    assert study_state(sessions, study_id) is StudyState.RECEIVING


def test_concurrent_claimers_never_claim_the_same_study(db_path: Path, engine: Engine) -> None:
    sessions = session_factory(engine)
    study_ids = make_ready_studies(sessions, 40)
    workers = 4
    # Each worker has its own engine, so its own connections to the file.
    engines = [make_engine(f"sqlite:///{db_path}", busy_timeout_ms=10_000) for _ in range(workers)]
    claims: dict[str, list[int]] = {f"w{n}": [] for n in range(workers)}
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def claimer(worker_id: str, worker_engine: Engine) -> None:
        worker_sessions = session_factory(worker_engine)
        try:
            start.wait()
            while (study_id := work.claim_study(worker_sessions, worker_id)) is not None:
                claims[worker_id].append(study_id)
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [
        threading.Thread(target=claimer, args=(worker_id, worker_engine))
        for worker_id, worker_engine in zip(claims, engines, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for worker_engine in engines:
        worker_engine.dispose()

    assert errors == []
    claimed = [study_id for ids in claims.values() for study_id in ids]
    assert sorted(claimed) == sorted(study_ids)  # each exactly once
    with sessions() as session:
        rows = session.execute(select(Study.id, Study.claimed_by)).all()
    owner = {study_id: worker_id for worker_id, ids in claims.items() for study_id in ids}
    assert {study_id: claimed_by for study_id, claimed_by in rows} == owner


def test_reset_processing_after_a_crash(sessions: sessionmaker[Session]) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    assert work.claim_study(sessions, "old-run") == study_id
    # The process dies here; a new one starts with a new worker id.
    new_worker = work.new_worker_id()
    assert work.claim_study(sessions, new_worker) is None
    with sessions() as session:
        assert work.reset_processing(session, new_worker) == [study_id]
    assert study_state(sessions, study_id) is StudyState.READY
    assert work.claim_study(sessions, new_worker) == study_id
    with sessions() as session:
        assert work.reset_processing(session, new_worker) == []  # its own claim is kept
    with sessions() as session, pytest.raises(LookupError):
        work.fail_study(session, study_id, "old-run", "late")  # the dead run's claim is gone
    with sessions() as session:
        events = session.scalars(select(AuditEvent.kind)).all()
        assert "recovery" in events


def test_a_study_that_keeps_killing_its_worker_is_failed(sessions: sessionmaker[Session]) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    for run in range(3):
        assert work.claim_study(sessions, f"run-{run}") == study_id
        with sessions() as session:
            work.reset_processing(session, f"run-{run + 1}", max_claims=3)
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        assert study.state is StudyState.FAILED
        assert study.error is not None and "3 claims" in study.error


def test_reclaim_stale_claims(sessions: sessionmaker[Session]) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    assert work.claim_study(sessions, "w1", now=at(100)) == study_id
    with sessions() as session:
        assert work.reclaim_stale(session, at(159), older_than_s=60) == []
    with sessions() as session:
        assert work.reclaim_stale(session, at(161), older_than_s=60) == [study_id]
    assert study_state(sessions, study_id) is StudyState.READY


def test_fail_study_keeps_the_error(sessions: sessionmaker[Session]) -> None:
    (study_id,) = make_ready_studies(sessions, 1)
    assert work.claim_study(sessions, "w1") == study_id
    with sessions() as session:
        work.fail_study(session, study_id, "w1", "model directory missing")
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        assert (study.state, study.error) == (StudyState.FAILED, "model directory missing")
        event = session.scalars(select(AuditEvent).where(AuditEvent.kind == "error")).one()
        assert event.study_uid == study.study_uid
        assert event.detail["error"] == "model directory missing"


def test_audit_events_and_rejected_associations(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        work.add_audit_event(session, "gate", {"passed": False}, study_uid="1.2.3", now=at(1))
    with sessions() as session:
        association_id = work.record_rejected_association(
            session,
            calling_aet="INTRUDER",
            called_aet="RADGATE",
            peer_host="10.0.0.9",
            peer_port=5000,
            reason="calling AE title not allowed",
        )
    with sessions() as session:
        association = session.get(Association, association_id)
        assert association is not None and association.outcome is AssociationOutcome.REJECTED
        kinds = {event.kind: event for event in session.scalars(select(AuditEvent))}
        assert kinds["gate"].detail == {"passed": False} and kinds["gate"].at == at(1)
        assert kinds["security"].detail["calling_aet"] == "INTRUDER"


# --- locking ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_locked_database_fails_after_the_busy_timeout_instead_of_hanging(
    db_path: Path, engine: Engine
) -> None:
    impatient = make_engine(f"sqlite:///{db_path}", busy_timeout_ms=200)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with (
            session_factory(impatient)() as session,
            pytest.raises(OperationalError, match="locked"),
        ):
            work.record_instance(session, received("1.1"), now=at(0))
        waited = time.monotonic() - started
        assert 0.15 <= waited < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        impatient.dispose()
    # Nothing half-recorded, and the database works again once the lock is gone.
    sessions = session_factory(engine)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    with sessions() as session:
        assert not work.record_instance(session, received("1.1"), now=at(1)).duplicate


def test_work_functions_refuse_a_session_with_a_transaction_open(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        session.execute(select(Study.id)).all()
        with pytest.raises(InvalidRequestError, match="their own transaction"):
            work.record_instance(session, received("1.1"), now=at(0))
