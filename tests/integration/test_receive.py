"""Receiving over DICOM: the gateway against DCMTK and pynetdicom peers on loopback.

What a sender relies on: Success only for what is durable in the spool and recorded
once; a clear failure status (and nothing left behind) for what is not; refused
callers stay out and are audited; a study is handed on only after a normal release
and the quiet period.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import signal
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import (
    CALLED_AET,
    HOST,
    GatewayHandle,
    GatewaySetup,
    ServeGateway,
    StartGateway,
    associated,
    dataset_bytes,
    dx_dataset,
    echoscu,
    gateway_config,
    save_as_is,
    scu,
    send_files,
    storescu,
    wait_until,
    write_dx,
)
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, evt
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db.models import AssociationOutcome, Instance, InstanceState, StudyState
from db.work import finish_study
from gateway import scp as scp_module
from gateway import spool as spool_module
from gateway.config import Config
from gateway.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATABASE_UNAVAILABLE,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_SPACE,
    STATUS_PROCESSING_FAILURE,
    STATUS_SPOOL_FAILED,
    STATUS_SUCCESS,
    file_preamble,
)
from gateway.service import Processor, claim_loop
from gateway.spool import TEMP_PREFIX, Spool
from inference.artifact import ModelCard

QUIET_S = 0.3
SUCCESS = "Success"


def stays(predicate: Callable[[], bool], duration_s: float, interval_s: float = 0.05) -> bool:
    """Whether `predicate` holds at every check for `duration_s` (a 'not before' check)."""
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval_s)
    return predicate()


def state_of(gateway: GatewayHandle, study_uid: str) -> StudyState | None:
    study = gateway.study(study_uid)
    return None if study is None else study.state


def assert_nothing_stored(gateway: GatewayHandle) -> None:
    assert gateway.instances() == []
    assert gateway.spool_files() == []


def assert_stored_as_sent(gateway: GatewayHandle, sent: list[Path]) -> None:
    """One row per sent file; its spool file holds the sent data set byte for byte."""
    rows = {row.sop_instance_uid: row for row in gateway.instances()}
    assert len(rows) == len(gateway.instances()) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path, stop_before_pixels=True)
        row = rows[original.SOPInstanceUID]
        stored = gateway.spool_dir / row.spool_path
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert row.size_bytes == stored.stat().st_size
        assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == original.SOPClassUID
        assert original.SOPInstanceUID not in row.spool_path
    assert len(gateway.spool_files()) == len(sent)


# --- verification and storage ----------------------------------------------------------


def test_echoscu_gets_success(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    result = echoscu(gateway.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


# storescu proposes a compressed transfer syntax only when told which one.
COMPRESSED = [
    (RLELossless, "-xr"),
    (JPEGLSLossless, "-xt"),
    (JPEG2000Lossless, "-xv"),
    (DeflatedExplicitVRLittleEndian, "-xd"),
]


def test_storescu_studies_are_stored_as_sent_and_recorded_once(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(study={"quiet_period_s": QUIET_S})
    first_study, second_study = generate_uid(), generate_uid()
    uncompressed = [
        write_dx(tmp_path / "in", study_uid=first_study, seed=1),
        write_dx(tmp_path / "in", study_uid=first_study, seed=2),
        write_dx(tmp_path / "in", study_uid=first_study, transfer_syntax=ImplicitVRLittleEndian),
    ]

    outcome = storescu(gateway.port, uncompressed)
    assert outcome.returncode == 0, outcome.output
    assert outcome.statuses == [SUCCESS] * len(uncompressed), outcome.output
    sent = list(uncompressed)
    for transfer_syntax, option in COMPRESSED:
        image = write_dx(tmp_path / "in", study_uid=second_study, transfer_syntax=transfer_syntax)
        outcome = storescu(gateway.port, [image], extra=[option])
        assert outcome.statuses == [SUCCESS], outcome.output
        sent.append(image)

    assert_stored_as_sent(gateway, sent)
    studies = {study.study_uid: study for study in gateway.studies()}
    assert set(studies) == {first_study, second_study}
    rows = gateway.instances()
    assert sum(row.study_id == studies[first_study].id for row in rows) == len(uncompressed)
    assert {row.modality for row in rows} == {"DX"}
    assert {row.body_part for row in rows} == {"CHEST"}
    assert {row.calling_aet for row in rows} == {"STORESCU"}
    assert studies[first_study].patient_id == "TEST-0001"
    assert studies[first_study].accession_number == "ACC1"
    wait_until(lambda: all(a.outcome is not None for a in gateway.associations()))
    associations = gateway.associations()
    assert {a.outcome for a in associations} == {AssociationOutcome.RELEASED}
    assert [a.instances_received for a in associations] == [3, 1, 1, 1, 1]
    assert {a.calling_aet for a in associations} == {"STORESCU"}
    for study_uid in (first_study, second_study):
        gateway.wait_for_state(study_uid, StudyState.READY)


def test_file_meta_written_for_the_spool_is_what_pydicom_writes(tmp_path: Path) -> None:
    preamble = file_preamble("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", RLELossless, "MODALITY")
    path = tmp_path / "meta.dcm"
    path.write_bytes(preamble + dataset_bytes(write_dx(tmp_path, sop_uid="1.2.3.45")))
    meta = pydicom.dcmread(path).file_meta
    assert meta.FileMetaInformationGroupLength == len(preamble) - 132 - 12
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == RLELossless
    assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID
    assert meta.SourceApplicationEntityTitle == "MODALITY"


def test_resends_are_acknowledged_and_the_first_copy_kept(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway()
    study_uid, sop_uid = generate_uid(), generate_uid()
    original = write_dx(tmp_path / "a", study_uid=study_uid, sop_uid=sop_uid, seed=1)
    different = write_dx(tmp_path / "b", study_uid=study_uid, sop_uid=sop_uid, seed=2)
    assert dataset_bytes(original) != dataset_bytes(different)

    assert storescu(gateway.port, [original]).statuses == [SUCCESS]
    assert storescu(gateway.port, [original]).statuses == [SUCCESS]
    assert send_files(gateway.port, [different]) == [STATUS_SUCCESS]

    assert_stored_as_sent(gateway, [original])
    wait_until(lambda: all(a.outcome is not None for a in gateway.associations()))
    assert [a.instances_received for a in gateway.associations()] == [1, 1, 1]
    receiver = gateway.service.receiver
    assert receiver is not None
    assert (receiver.stats.stored, receiver.stats.duplicates) == (1, 2)


# --- who may send ----------------------------------------------------------------------


def test_disallowed_calling_ae_is_rejected_and_audited(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(ae={"allowed_calling_aets": ["MODALITY1"]})
    image = write_dx(tmp_path)

    refused = storescu(gateway.port, [image], calling_aet="OTHER")

    assert refused.returncode != 0
    assert refused.rejected, refused.output
    assert refused.statuses == []
    assert echoscu(gateway.port, calling_aet="OTHER").returncode != 0
    assert_nothing_stored(gateway)
    wait_until(lambda: len(gateway.audit_events("security")) == 2)
    detail = gateway.audit_events("security")[0].detail
    assert detail["calling_aet"] == "OTHER"
    assert detail["peer_host"] == HOST
    assert "Calling AE title not recognised" in detail["reason"]
    assert {a.outcome for a in gateway.associations()} == {AssociationOutcome.REJECTED}

    allowed = storescu(gateway.port, [image], calling_aet="MODALITY1")
    assert allowed.statuses == [SUCCESS], allowed.output
    assert len(gateway.instances()) == 1


# --- when a study is complete ----------------------------------------------------------


def test_study_is_ready_only_after_release_and_quiet_period(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    quiet_s = 0.5
    gateway = start_gateway(study={"quiet_period_s": quiet_s})
    study_uid = generate_uid()
    first = write_dx(tmp_path, study_uid=study_uid, seed=1)
    second = write_dx(tmp_path, study_uid=study_uid, seed=2)

    with associated(gateway.port) as assoc:
        assert assoc.send_c_store(first).Status == STATUS_SUCCESS
        # Quiet for longer than the quiet period, but the sender has not released.
        assert stays(lambda: state_of(gateway, study_uid) is StudyState.RECEIVING, 3 * quiet_s)
        assert assoc.send_c_store(second).Status == STATUS_SUCCESS
        last_store = time.monotonic()
    gateway.wait_for_state(study_uid, StudyState.READY)
    waited = time.monotonic() - last_store

    assert waited >= quiet_s
    study = gateway.study(study_uid)
    assert study is not None and study.released_at is not None
    assert study.released_at >= study.last_received_at


def test_release_counts_when_the_connection_closes_before_it_is_reported(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # storescu closes the connection as soon as it has the A-RELEASE-RP; pynetdicom
    # may report that close before the release. Delay the release report to force it.
    def late_release_report(event: evt.Event) -> None:
        time.sleep(0.5)

    handlers = scp_module.event_handlers
    monkeypatch.setattr(
        scp_module,
        "event_handlers",
        lambda context: [(evt.EVT_RELEASED, late_release_report), *handlers(context)],
    )
    gateway = start_gateway(study={"quiet_period_s": QUIET_S})
    study_uid = generate_uid()
    assert storescu(gateway.port, [write_dx(tmp_path, study_uid=study_uid)]).statuses == [SUCCESS]

    gateway.wait_for_state(study_uid, StudyState.READY)
    assert gateway.associations()[0].outcome is AssociationOutcome.RELEASED


def test_aborted_association_does_not_make_the_study_ready(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(study={"quiet_period_s": QUIET_S, "unreleased_timeout_s": 300})
    study_uid = generate_uid()
    image = write_dx(tmp_path, study_uid=study_uid)

    aborted = storescu(gateway.port, [image], extra=["--abort"])

    assert aborted.statuses == [SUCCESS], aborted.output
    wait_until(lambda: gateway.associations()[0].outcome is AssociationOutcome.ABORTED)
    assert stays(lambda: state_of(gateway, study_uid) is StudyState.RECEIVING, 5 * QUIET_S)
    # The sender comes back and resends normally: now the study completes.
    assert storescu(gateway.port, [image]).statuses == [SUCCESS]
    gateway.wait_for_state(study_uid, StudyState.READY)
    assert len(gateway.instances()) == 1


def test_connection_dropped_mid_association_counts_as_aborted(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(study={"quiet_period_s": QUIET_S})
    study_uid = generate_uid()
    assoc = scu().associate(HOST, gateway.port, ae_title=CALLED_AET)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(write_dx(tmp_path, study_uid=study_uid)).Status == 0
        # No A-RELEASE, no A-ABORT: the TCP connection just goes away.
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        wait_until(lambda: gateway.associations()[0].outcome is AssociationOutcome.ABORTED)
    finally:
        assoc.abort()
    assert stays(lambda: state_of(gateway, study_uid) is StudyState.RECEIVING, 5 * QUIET_S)


def test_idle_sender_is_dropped_after_the_network_timeout(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(ae={"network_timeout_s": 1.0}, study={"quiet_period_s": QUIET_S})
    study_uid = generate_uid()
    assoc = scu(timeout_s=30).associate(HOST, gateway.port, ae_title=CALLED_AET)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(write_dx(tmp_path, study_uid=study_uid)).Status == 0
        # The sender stalls; the gateway gives up on it and frees the association.
        wait_until(lambda: assoc.is_aborted, timeout_s=10)
    finally:
        assoc.abort()
    (association,) = gateway.associations()
    assert association.outcome is AssociationOutcome.ABORTED
    assert association.reason == "aborted"
    assert stays(lambda: state_of(gateway, study_uid) is StudyState.RECEIVING, 5 * QUIET_S)


# --- data sets the gateway refuses -----------------------------------------------------


def _without(tmp_path: Path, keyword: str, **options: str) -> Path:
    ds = dx_dataset(**options)
    delattr(ds, keyword)
    return save_as_is(ds, tmp_path / f"without-{keyword}.dcm")


def test_missing_sop_instance_uid_is_refused_and_nothing_kept(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_gateway()
    with caplog.at_level(logging.WARNING, logger="gateway.scp"):
        # pynetdicom takes the request's UID from the file meta; the data set lacks it.
        statuses = send_files(gateway.port, [_without(tmp_path, "SOPInstanceUID")])
    assert statuses == [STATUS_DATASET_MISMATCH]
    assert "SOPInstanceUID is missing" in caplog.text
    assert_nothing_stored(gateway)


def test_missing_study_instance_uid_is_refused_for_storescu(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway()
    outcome = storescu(gateway.port, [_without(tmp_path, "StudyInstanceUID")])
    assert len(outcome.statuses) == 1
    assert outcome.statuses[0] != SUCCESS, outcome.output
    assert "0xa900" in outcome.output.lower() or "DoesNotMatch" in outcome.output
    assert_nothing_stored(gateway)


def test_data_set_that_is_not_the_requested_instance_is_refused(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway()
    ds = dx_dataset()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request names another
    path = save_as_is(ds, tmp_path / "mismatch.dcm")
    assert send_files(gateway.port, [path]) == [STATUS_DATASET_MISMATCH]
    assert_nothing_stored(gateway)


def test_unparseable_data_set_cannot_be_understood(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway()
    valid = write_dx(tmp_path)
    header = valid.read_bytes()[: len(valid.read_bytes()) - len(dataset_bytes(valid))]
    # (0008,0005) OB with a length far past the end of the data.
    broken = struct.pack("<HH", 0x0008, 0x0005) + b"OB\0\0" + struct.pack("<I", 0xFFFFFFF0)
    path = tmp_path / "broken.dcm"
    path.write_bytes(header + broken + b"x" * 10)
    assert send_files(gateway.port, [path]) == [STATUS_CANNOT_UNDERSTAND]
    assert_nothing_stored(gateway)
    assert echoscu(gateway.port).returncode == 0


@pytest.mark.parametrize(
    "hostile_uid",
    ["../../../../tmp/x", "..", "/etc/passwd", "1.2.3/../../" + "9" * 40, "Z" * 64],
)
def test_hostile_uids_never_leave_the_spool(
    start_gateway: StartGateway, tmp_path: Path, hostile_uid: str
) -> None:
    gateway = start_gateway()
    image = write_dx(tmp_path / "in", "hostile.dcm", sop_uid=hostile_uid, study_uid=hostile_uid)
    statuses = send_files(gateway.port, [image])
    assert statuses == [STATUS_SUCCESS]
    (row,) = gateway.instances()
    assert row.sop_instance_uid == hostile_uid
    for path in gateway.spool_files():
        assert path.resolve().is_relative_to(gateway.spool_dir.resolve())
        assert path.relative_to(gateway.spool_dir).parts[0] == "instances"
    assert not (tmp_path / "x").exists() and not Path("/tmp/x").exists()


# --- out of resources ------------------------------------------------------------------


def test_below_the_free_space_watermark_is_out_of_resources(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(storage={"min_free_mb": 1 << 40})
    image = write_dx(tmp_path)
    assert send_files(gateway.port, [image]) == [STATUS_OUT_OF_SPACE]
    outcome = storescu(gateway.port, [image])
    assert outcome.statuses and outcome.statuses[0] != SUCCESS, outcome.output
    assert "OutOfResources" in outcome.output or "0xa700" in outcome.output.lower()
    assert_nothing_stored(gateway)


def test_full_disk_is_out_of_resources_and_recovers(
    serve_gateway: ServeGateway, tmp_path: Path
) -> None:
    # The kernel refuses writes past 8 MiB per file (like `ulimit -f`): a 10 MiB image
    # cannot be stored, small ones can, database included.
    setup = gateway_config(tmp_path / "gw")
    gateway = serve_gateway(setup, fsize_limit=8 * 1024 * 1024)
    big = write_dx(tmp_path / "in", "big.dcm", rows=2560, columns=2048)
    small = write_dx(tmp_path / "in", "small.dcm")
    assert big.stat().st_size > 10 * 1024 * 1024

    assert send_files(gateway.port, [big]) == [STATUS_OUT_OF_SPACE]
    assert_nothing_stored(gateway)
    assert send_files(gateway.port, [small, big, small]) == [
        STATUS_SUCCESS,
        STATUS_OUT_OF_SPACE,
        STATUS_SUCCESS,
    ]
    assert_stored_as_sent(gateway, [small])
    assert not [p for p in gateway.spool_files() if p.name.startswith(TEMP_PREFIX)]
    assert gateway.stop() == 0


def _database_file(gateway: GatewayHandle) -> Path:
    return Path(gateway.config.storage.database_url.removeprefix("sqlite:///"))


def test_database_locked_past_busy_timeout_is_out_of_resources(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(storage={"busy_timeout_ms": 200})
    refused_image = write_dx(tmp_path, seed=1)
    accepted_image = write_dx(tmp_path, seed=2)
    blocker = sqlite3.connect(
        _database_file(gateway), isolation_level=None, check_same_thread=False
    )
    try:
        with associated(gateway.port) as assoc:
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                assert assoc.send_c_store(refused_image).Status == STATUS_DATABASE_UNAVAILABLE
            finally:
                blocker.execute("ROLLBACK")
            assert_nothing_stored(gateway)

            # A lock shorter than the busy timeout only delays the store.
            blocker.execute("BEGIN EXCLUSIVE")
            unlock = threading.Timer(0.05, blocker.execute, ["ROLLBACK"])
            unlock.start()
            try:
                assert assoc.send_c_store(accepted_image).Status == STATUS_SUCCESS
            finally:
                unlock.join(5)
    finally:
        blocker.close()
    assert_stored_as_sent(gateway, [accepted_image])


def test_database_down_when_the_association_opens(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(storage={"busy_timeout_ms": 200})
    refused_image, accepted_image = write_dx(tmp_path, seed=1), write_dx(tmp_path, seed=2)
    blocker = sqlite3.connect(_database_file(gateway), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with associated(gateway.port) as assoc:
            try:
                # Neither the association nor the instance can be recorded.
                assert assoc.send_c_store(refused_image).Status == STATUS_DATABASE_UNAVAILABLE
            finally:
                blocker.execute("ROLLBACK")
            assert_nothing_stored(gateway)
            assert gateway.associations() == []
            assert assoc.send_c_store(accepted_image).Status == STATUS_SUCCESS
    finally:
        blocker.close()
    assert_stored_as_sent(gateway, [accepted_image])
    wait_until(lambda: gateway.associations()[0].outcome is AssociationOutcome.RELEASED)
    assert gateway.associations()[0].instances_received == 1


def test_spool_io_error_is_out_of_resources(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = start_gateway()

    def failing_fsync(descriptor: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fsync", failing_fsync)
    assert send_files(gateway.port, [write_dx(tmp_path)]) == [STATUS_SPOOL_FAILED]
    monkeypatch.undo()
    assert_nothing_stored(gateway)


def test_unexpected_error_is_a_processing_failure_and_nothing_kept(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = start_gateway()

    def broken_record(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(scp_module, "record_instance", broken_record)
    assert send_files(gateway.port, [write_dx(tmp_path)]) == [STATUS_PROCESSING_FAILURE]
    assert_nothing_stored(gateway)
    assert echoscu(gateway.port).returncode == 0


def test_restart_closes_associations_left_open_and_removes_temporary_files(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_gateway(storage={"busy_timeout_ms": 200}, study={"quiet_period_s": QUIET_S})
    study_uid = generate_uid()
    blocker = sqlite3.connect(_database_file(gateway), isolation_level=None)
    try:
        with caplog.at_level(logging.ERROR, logger="gateway.scp"):
            with associated(gateway.port) as assoc:
                assert assoc.send_c_store(write_dx(tmp_path, study_uid=study_uid)).Status == 0
                blocker.execute("BEGIN EXCLUSIVE")
            # The release cannot be recorded while the database is locked.
            wait_until(lambda: "not closed in the database" in caplog.text)
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    (association,) = gateway.associations()
    assert association.ended_at is None
    leftover = gateway.spool_dir / "instances" / f"{TEMP_PREFIX}killed-mid-write"
    leftover.write_bytes(b"partial")

    gateway.restart()

    (association,) = gateway.associations()
    assert association.outcome is AssociationOutcome.ABORTED
    assert association.reason == "gateway restarted"
    assert association.instances_received == 1
    assert not leftover.exists()
    assert len(gateway.spool_files()) == 1
    # Its delivery did not end in a release: not ready before the unreleased timeout.
    assert stays(lambda: state_of(gateway, study_uid) is StudyState.RECEIVING, 5 * QUIET_S)


def test_ready_studies_are_handed_to_the_processor(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    processed: list[int] = []

    def processor_factory(
        config: Config, sessions: sessionmaker[Session], spool: Spool, worker_id: str
    ) -> Processor:
        def process(study_id: int) -> None:
            # Recorded first: the test wakes as soon as finish_study commits PROCESSED.
            processed.append(study_id)
            # What a pipeline does at the end: every instance handled, study finished.
            with sessions() as session, session.begin():
                session.execute(
                    update(Instance)
                    .where(Instance.study_id == study_id)
                    .values(state=InstanceState.CLASSIFIED)
                )
            with sessions() as session:
                finish_study(session, study_id, worker_id)

        return Processor(
            process_ready=claim_loop(sessions, process, worker_id),
            model_id="test-model",
            device="cpu",
        )

    gateway = start_gateway(processor_factory=processor_factory, study={"quiet_period_s": QUIET_S})
    assert "model test-model on cpu" in gateway.service.describe()
    study_uid = generate_uid()
    assert storescu(gateway.port, [write_dx(tmp_path, study_uid=study_uid)]).statuses == [SUCCESS]

    study = gateway.wait_for_state(study_uid, StudyState.PROCESSED)
    assert processed == [study.id]


# --- logs ------------------------------------------------------------------------------


def test_patient_names_and_ids_stay_out_of_logs(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name, patient_id = "ZEBEDIAH^QUIXOTIC", "PID-ZEBEDIAH-77"
    options = {"patient_name": name, "patient_id": patient_id}
    sop_uid = generate_uid()
    with caplog.at_level(logging.INFO):
        gateway = start_gateway(storage={"busy_timeout_ms": 200})
        first = write_dx(tmp_path / "a", sop_uid=sop_uid, seed=1, **options)
        different = write_dx(tmp_path / "b", sop_uid=sop_uid, seed=2, **options)
        no_study_path = _without(tmp_path, "StudyInstanceUID", **options)
        statuses = send_files(gateway.port, [first, different, no_study_path])
        # A database failure: its error must not carry the statement's parameters.
        blocker = sqlite3.connect(_database_file(gateway), isolation_level=None)
        try:
            with associated(gateway.port) as assoc:
                blocker.execute("BEGIN EXCLUSIVE")
                locked_out = write_dx(tmp_path / "c", **options)
                statuses.append(int(assoc.send_c_store(locked_out).Status))
                blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        wait_until(lambda: all(a.outcome is not None for a in gateway.associations()))
    assert statuses == [
        STATUS_SUCCESS,
        STATUS_SUCCESS,
        STATUS_DATASET_MISMATCH,
        STATUS_DATABASE_UNAVAILABLE,
    ]
    assert "differs from the first copy" in caplog.text
    assert "database is locked" in caplog.text
    assert "ZEBEDIAH" not in caplog.text
    assert patient_id not in caplog.text
    assert gateway.studies()[0].patient_name == name


# --- stopping --------------------------------------------------------------------------


def test_sigterm_lets_the_open_association_finish_then_exits_zero(
    serve_gateway: ServeGateway, tmp_path: Path
) -> None:
    setup = gateway_config(tmp_path / "gw", study={"quiet_period_s": QUIET_S})
    gateway = serve_gateway(setup)
    study_uid = generate_uid()
    with associated(gateway.port) as assoc:
        assert assoc.send_c_store(write_dx(tmp_path, study_uid=study_uid, seed=1)).Status == 0
        gateway.process.send_signal(signal.SIGTERM)
        # No new associations once stopping; the open one carries on.
        wait_until(lambda: "SIGTERM received" in gateway.log())
        wait_until(lambda: echoscu(gateway.port).returncode != 0)
        assert assoc.send_c_store(write_dx(tmp_path, study_uid=study_uid, seed=2)).Status == 0
    assert gateway.stop(timeout_s=30) == 0
    log = gateway.log()
    assert "radgate stopped" in log and "cut short" not in log
    assert len(gateway.instances()) == 2
    assert gateway.associations()[0].outcome is AssociationOutcome.RELEASED


def test_radgate_serve_logs_one_start_line_and_exits_zero_on_sigterm(
    serve_gateway: ServeGateway, tmp_path: Path, tiny_model: Path
) -> None:
    setup: GatewaySetup = gateway_config(
        tmp_path / "gw", model={"dir": str(tiny_model), "device": "cpu"}
    )
    gateway = serve_gateway(setup, receive_only=False)
    assert echoscu(gateway.port).returncode == 0
    assert gateway.stop(signal.SIGTERM) == 0
    start_lines = [line for line in gateway.log().splitlines() if "radgate serving" in line]
    assert len(start_lines) == 1, gateway.log()
    line = start_lines[0]
    assert f"AE {setup.config.ae.title} on {HOST}:{gateway.port}" in line
    assert f"model {ModelCard.read(tiny_model).model_id} on cpu" in line
    assert "radgate stopped" in gateway.log()
