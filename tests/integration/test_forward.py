"""Forwarding to real peers on loopback: Orthanc, DCMTK storescp and pynetdicom SCPs.

Each test builds a processed study in a real SQLite file the way the pipeline leaves it
(the received original in the spool, the RADGATE-tagged copy, a Grad-CAM Secondary
Capture and the result SR, with their rows), routes it with `create_forward_jobs`, runs
the `Forwarder` and looks at what arrived: through Orthanc's REST API, or what the SCP
saw. Destinations use a tiny backoff so retries take fractions of a second.
"""

from __future__ import annotations

import copy
import hashlib
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from conftest import StoreSCP
from orthanc import UNCOMPRESSED_SYNTAXES, OrthancServer, free_port
from pydicom.dataset import Dataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db import work
from db.models import (
    AuditEvent,
    ForwardedInstance,
    ForwardJob,
    ForwardJobState,
    GateDecision,
    Instance,
    InstanceState,
    Output,
    OutputKind,
    Prediction,
    StudyState,
)
from db.session import make_engine, migrate, session_factory
from gateway import outputs
from gateway.cli import main
from gateway.config import Config, load_config
from gateway.forward import (
    FORWARD_EVENT,
    STATUS_HANDLER_EXCEPTION,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_WARNING_COERCION,
    Forwarder,
    StatusOutcome,
    classify_status,
)
from gateway.routing import create_forward_jobs
from inference.samples import VARIANTS, build_dataset, find_sources, read_grey_png

HOST = "127.0.0.1"
SUBPROCESS_TIMEOUT_S = 60.0
DEADLINE_S = 30.0
WEIGHTS_SHA256 = "ab" * 32
# Statuses the test SCP answers (named so that a reader knows what each test means).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


# --- waiting ------------------------------------------------------------------------------


def wait_for_port(
    port: int, timeout_s: float = 20.0, alive: Callable[[], bool] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None and not alive():
            raise AssertionError(f"server for port {port} exited before it listened")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"nothing listened on {HOST}:{port} within {timeout_s:g} s"
                ) from None
            time.sleep(0.05)


# --- the gateway side: configuration, database, a processed study -----------------------


def destination(port: int, **options: Any) -> dict[str, Any]:
    return {
        "name": "pacs",
        "ae_title": "ORTHANC",
        "host": HOST,
        "port": port,
        "max_attempts": 3,
        "backoff_s": [0.2, 0.5],
        "timeout_s": 5,
        **options,
    }


@dataclass
class Study:
    study_id: int
    study_uid: str
    originals: dict[str, Path]  # SOP Instance UID -> received file in the spool
    gradcam: list[str]
    report: str

    @property
    def uids(self) -> set[str]:
        return {*self.originals, *self.gradcam, self.report}


@dataclass
class Gateway:
    """The database, spool and configuration a forwarder works with."""

    folder: Path
    config_path: Path
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    sample_data: Path
    studies: list[Study] = field(default_factory=list)

    def forwarder(self) -> Forwarder:
        return Forwarder(self.config, self.sessions)

    def reconfigure(self, destinations: Sequence[dict[str, Any]]) -> None:
        data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        data["destinations"] = list(destinations)
        data["routes"] = [
            {"name": "all", "when": {}, "forward_to": [d["name"] for d in destinations]}
        ]
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        self.config = load_config(self.config_path)

    def job(self, study: Study | None = None) -> ForwardJob:
        study = study or self.studies[-1]
        with self.sessions() as session:
            (job,) = session.scalars(
                select(ForwardJob).where(ForwardJob.study_id == study.study_id)
            ).all()
            return job

    def delivered(self, job_id: int) -> dict[str, int | None]:
        with self.sessions() as session:
            rows = session.scalars(
                select(ForwardedInstance).where(ForwardedInstance.job_id == job_id)
            )
            return {row.sop_instance_uid: row.status for row in rows}

    def forward_events(self) -> list[dict[str, Any]]:
        with self.sessions() as session:
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.kind == FORWARD_EVENT).order_by(AuditEvent.id)
            )
            return [event.detail for event in events]

    def run_until(
        self, states: Sequence[ForwardJobState], timeout_s: float = DEADLINE_S
    ) -> ForwardJob:
        """Run the forwarder repeatedly until the job reaches one of `states`."""
        forwarder = self.forwarder()
        deadline = time.monotonic() + timeout_s
        while True:
            forwarder.run_due()
            job = self.job()
            if job.state in states:
                return job
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"job still {job.state.value} after {timeout_s:g} s: {job.last_error}"
                )
            time.sleep(0.05)

    def add_study(self, *, variant: str = "plain", instances: int = 1) -> Study:
        """A processed and routed study, as the receiver and the pipeline leave it."""
        study = _processed_study(self, variant, instances)
        with self.sessions() as session:
            assert create_forward_jobs(session, self.config, study.study_id)
        self.studies.append(study)
        return study


@pytest.fixture
def gateway(tmp_path: Path, sample_data_dir: Path) -> Iterator[Callable[..., Gateway]]:
    """``gateway(destination(port, ...))``: configuration, migrated SQLite and spool."""
    made: list[Gateway] = []

    def make(*destinations: dict[str, Any]) -> Gateway:
        folder = tmp_path / f"gateway{len(made)}"
        folder.mkdir()
        data = {
            "ae": {"title": "RADGATE", "port": free_port()},
            "storage": {"spool_dir": "spool", "database_url": "sqlite:///radgate.db"},
            "destinations": list(destinations),
            "routes": [
                {"name": "all", "when": {}, "forward_to": [d["name"] for d in destinations]}
            ],
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        config = load_config(path)
        engine = make_engine(config.storage.database_url, config.storage.busy_timeout_ms)
        migrate(engine)
        env = Gateway(folder, path, config, engine, session_factory(engine), sample_data_dir)
        made.append(env)
        return env

    yield make
    for env in made:
        env.engine.dispose()


def _result(label: str = "chest") -> outputs.InstanceResult:
    other = "abd" if label == "chest" else "chest"
    return outputs.InstanceResult(
        gate_passed=True,
        reasons=(),
        label=label,
        probability=0.97,
        probabilities={label: 0.97, other: 0.03},
        model_id="radgate-test",
        weights_sha256=WEIGHTS_SHA256,
    )


def _source_datasets(env: Gateway, variant: str, count: int) -> list[Dataset]:
    source = next(
        s for s in find_sources(env.sample_data) if s.split == "test" and s.label == "chest"
    )
    grey, _ = read_grey_png(source.path)
    first = build_dataset(source, VARIANTS[variant], grey)
    # New UIDs per call: tests may add several studies to one database.
    first.StudyInstanceUID = generate_uid()
    first.SeriesInstanceUID = generate_uid()
    datasets = []
    for number in range(1, count + 1):
        ds = copy.deepcopy(first)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        datasets.append(ds)
    return datasets


def _processed_study(env: Gateway, variant: str, count: int) -> Study:
    spool = Path(env.config.storage.spool_dir)
    (spool / "in").mkdir(parents=True, exist_ok=True)
    (spool / "derived").mkdir(parents=True, exist_ok=True)
    datasets = _source_datasets(env, variant, count)
    study_uid = str(datasets[0].StudyInstanceUID)
    with env.sessions() as session:
        association = work.open_association(
            session, calling_aet="MODALITY", called_aet="RADGATE", peer_host=HOST, peer_port=1
        )
    originals: dict[str, Path] = {}
    instance_ids: dict[str, int] = {}
    study_id = 0
    for ds in datasets:
        relative = f"in/{ds.SOPInstanceUID}.dcm"
        ds.save_as(spool / relative, enforce_file_format=True)
        data = (spool / relative).read_bytes()
        with env.sessions() as session:
            recorded = work.record_instance(
                session,
                work.ReceivedInstance(
                    study_uid=study_uid,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    spool_path=relative,
                    sha256=hashlib.sha256(data).hexdigest(),
                    size_bytes=len(data),
                    series_uid=str(ds.SeriesInstanceUID),
                    modality=str(ds.Modality),
                    body_part=ds.get("BodyPartExamined"),
                    calling_aet="MODALITY",
                    association_id=association,
                ),
            )
        study_id = recorded.study_id
        instance_ids[str(ds.SOPInstanceUID)] = recorded.instance_id
        originals[str(ds.SOPInstanceUID)] = spool / relative
    with env.sessions() as session:
        work.close_association(session, association, "released")
    with env.sessions() as session:
        work.mark_ready(session, datetime.now(UTC) + timedelta(minutes=1), 0)
    assert work.claim_study(env.sessions, "test-worker") == study_id

    now = datetime.now(UTC)
    result = _result()
    rows: list[Output] = []
    gradcam: list[str] = []
    gradcam_series = generate_uid()
    # The pipeline reads the originals back from the spool: the same here.
    sources = [pydicom.dcmread(path) for path in originals.values()]
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        tagged = outputs.tag_original(ds, result)
        tagged_path = f"derived/{uid}-tagged.dcm"
        outputs.write_dataset(tagged, spool / tagged_path)
        rows.append(
            _output(
                study_id, instance_ids[uid], OutputKind.TAGGED_ORIGINAL, tagged, tagged_path, now
            )
        )
        overlay = np.zeros((int(ds.Rows), int(ds.Columns), 3), dtype=np.uint8)
        overlay[..., 0] = np.linspace(0, 255, int(ds.Columns), dtype=np.uint8)
        capture = outputs.gradcam_secondary_capture(
            ds, overlay, result, series_instance_uid=gradcam_series, sop_instance_uid=generate_uid()
        )
        capture_path = f"derived/{capture.SOPInstanceUID}.dcm"
        outputs.write_dataset(capture, spool / capture_path)
        rows.append(
            _output(study_id, instance_ids[uid], OutputKind.GRADCAM_SC, capture, capture_path, now)
        )
        gradcam.append(str(capture.SOPInstanceUID))
    report = outputs.result_report(
        sources,
        [result] * len(sources),
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    report_path = f"derived/{report.SOPInstanceUID}.dcm"
    outputs.write_dataset(report, spool / report_path)
    rows.append(_output(study_id, None, OutputKind.REPORT_SR, report, report_path, now))
    with env.sessions() as session, session.begin():
        for uid, instance_id in instance_ids.items():
            session.add(
                GateDecision(instance_id=instance_id, passed=True, reasons=[], decided_at=now)
            )
            session.add(
                Prediction(
                    instance_id=instance_id,
                    label="chest",
                    probabilities={"chest": 0.97, "abd": 0.03},
                    top_probability=0.97,
                    model_id="radgate-test",
                    weights_sha256=WEIGHTS_SHA256,
                    device="cpu",
                    inference_ms=1.0,
                    created_at=now,
                )
            )
            instance = session.get(Instance, instance_id)
            assert instance is not None and uid == instance.sop_instance_uid
            instance.state = InstanceState.CLASSIFIED
        session.add_all(rows)
    with env.sessions() as session:
        assert work.finish_study(session, study_id, "test-worker") is StudyState.PROCESSED
    return Study(study_id, study_uid, originals, gradcam, str(report.SOPInstanceUID))


def _output(
    study_id: int, instance_id: int | None, kind: OutputKind, ds: Dataset, path: str, now: datetime
) -> Output:
    return Output(
        study_id=study_id,
        instance_id=instance_id,
        kind=kind,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        spool_path=path,
        created_at=now,
    )


def radgate_label(ds: Dataset) -> str | None:
    try:
        block = ds.private_block(outputs.PRIVATE_GROUP, outputs.PRIVATE_CREATOR)
        return str(block[outputs.ELEMENT_LABEL].value)
    except KeyError:
        return None


# --- other peers: DCMTK storescp and a pynetdicom SCP ------------------------------------


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start DCMTK storescp with extra options; returns its port. Killed at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str, ae_title: str = "STORESCP") -> int:
        port = free_port()
        folder = tmp_path / f"storescp{len(processes)}"
        folder.mkdir()
        process = subprocess.Popen(
            ["storescp", "-aet", ae_title, "-od", str(folder), *options, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_for_port(port, alive=lambda: process.poll() is None)
        return port

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(SUBPROCESS_TIMEOUT_S)


# --- Orthanc: the study arrives, tagged, exactly once ------------------------------------


def test_a_study_arrives_at_orthanc_tagged_with_gradcam_and_report_exactly_once(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc(ae_title="PACS")
    env = gateway(destination(pacs.dicom_port, ae_title="PACS"))
    study = env.add_study(instances=2)
    forwarder = env.forwarder()

    assert forwarder.run_due() == 1
    job = env.job()
    assert (job.state, job.attempts, job.last_error) == (ForwardJobState.DELIVERED, 1, None)
    assert job.delivered_at is not None
    assert env.delivered(job.id) == dict.fromkeys(study.uids, STATUS_SUCCESS)

    stored = pacs.datasets(study.study_uid)
    assert set(stored) == study.uids and pacs.instance_count() == 5
    for uid in study.originals:
        assert radgate_label(stored[uid]) == "CHEST"  # the tagged copy, not the original
        assert (
            stored[uid].SeriesInstanceUID == pydicom.dcmread(study.originals[uid]).SeriesInstanceUID
        )
    for uid in study.gradcam:
        assert stored[uid].SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert stored[uid].SeriesDescription == outputs.GRADCAM_SERIES_DESCRIPTION
    assert stored[study.report].Modality == "SR"
    assert stored[study.report].SeriesDescription == outputs.REPORT_SERIES_DESCRIPTION

    (event,) = env.forward_events()
    assert event["atna_event_id"] == "110104" and event["outcome"] == "delivered"
    assert (event["destination"], event["calling_aet"], event["called_aet"]) == (
        "pacs",
        "RADGATE",
        "PACS",
    )
    assert event["instances_sent"] == 5 and set(event["sop_instance_uids"]) == study.uids

    # Nothing is due any more; and a job requeued with nothing new sends nothing again.
    assert forwarder.run_due() == 0
    with env.sessions() as session, session.begin():
        requeued = session.get(ForwardJob, job.id)
        assert requeued is not None
        requeued.state = ForwardJobState.PENDING
    assert forwarder.run_due() == 1
    assert env.job().state is ForwardJobState.DELIVERED
    assert pacs.instance_count() == 5
    assert env.forward_events()[-1]["instances_sent"] == 0


def test_send_list_limits_what_goes(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc()
    env = gateway(destination(pacs.dicom_port))
    data = yaml.safe_load(env.config_path.read_text())
    data["routes"][0]["send"] = ["gradcam", "report"]
    env.config_path.write_text(yaml.safe_dump(data))
    env.config = load_config(env.config_path)
    study = env.add_study()
    assert env.forwarder().run_due() == 1
    assert set(pacs.datasets(study.study_uid)) == {*study.gradcam, study.report}


def test_an_original_without_a_tagged_copy_is_sent_as_received(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc()
    env = gateway(destination(pacs.dicom_port))
    study = env.add_study()
    with env.sessions() as session, session.begin():
        for output in session.scalars(
            select(Output).where(Output.kind == OutputKind.TAGGED_ORIGINAL)
        ):
            session.delete(output)
    env.forwarder().run_due()
    ((uid, path),) = study.originals.items()
    arrived = pacs.datasets(study.study_uid)[uid]
    assert radgate_label(arrived) is None
    assert arrived.PixelData == pydicom.dcmread(path).PixelData


# --- transfer syntaxes -------------------------------------------------------------------


def test_an_uncompressed_only_destination_gets_a_jpeg2000_study_decompressed(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc(accepted_transfer_syntaxes=UNCOMPRESSED_SYNTAXES)
    env = gateway(destination(pacs.dicom_port))
    study = env.add_study(variant="jpeg2000")
    ((uid, path),) = study.originals.items()
    original = pydicom.dcmread(path)
    assert original.file_meta.TransferSyntaxUID == JPEG2000Lossless

    env.forwarder().run_due()
    assert env.job().state is ForwardJobState.DELIVERED
    arrived = pacs.datasets(study.study_uid)
    assert set(arrived) == study.uids
    received = arrived[uid]
    assert received.file_meta.TransferSyntaxUID in UNCOMPRESSED_SYNTAXES
    assert np.array_equal(received.pixel_array, original.pixel_array)
    assert radgate_label(received) == "CHEST"
    assert env.forward_events()[-1]["decompressed"] == [uid]


def test_a_destination_that_takes_jpeg2000_gets_it_unchanged(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc()
    env = gateway(destination(pacs.dicom_port))
    study = env.add_study(variant="jpeg2000")
    ((uid, path),) = study.originals.items()
    env.forwarder().run_due()
    received = pacs.datasets(study.study_uid)[uid]
    assert received.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert received.PixelData == pydicom.dcmread(path).PixelData
    assert "decompressed" not in env.forward_events()[-1]


# --- retries and the dead letter ---------------------------------------------------------


def test_a_destination_down_at_first_gets_the_study_after_retries(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc(start=False)
    env = gateway(destination(pacs.dicom_port, max_attempts=20, backoff_s=[1.0, 0.2]))
    study = env.add_study()

    assert env.forwarder().run_due() == 1
    job = env.job()
    assert (job.state, job.attempts) == (ForwardJobState.PENDING, 1)
    assert job.last_error is not None and "cannot connect" in job.last_error
    assert job.next_attempt_at == job.updated_at + timedelta(seconds=1.0)
    assert env.forwarder().run_due() == 0  # not due before the backoff

    pacs.start()
    job = env.run_until([ForwardJobState.DELIVERED, ForwardJobState.DEAD])
    assert job.state is ForwardJobState.DELIVERED and job.attempts >= 2
    assert set(pacs.datasets(study.study_uid)) == study.uids and pacs.instance_count() == 3
    outcomes = [event["outcome"] for event in env.forward_events()]
    assert outcomes[0] == "retry" and outcomes[-1] == "delivered"


def test_a_destination_that_stays_down_is_dead_lettered_then_retried_by_command(
    gateway: Callable[..., Gateway],
    orthanc: Callable[..., OrthancServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pacs = orthanc(start=False)
    env = gateway(destination(pacs.dicom_port, max_attempts=2, backoff_s=[0.1]))
    study = env.add_study()

    job = env.run_until([ForwardJobState.DEAD])
    assert (job.attempts, job.permanent_failure) == (2, False)
    assert job.last_error is not None and "gave up after 2 attempts" in job.last_error
    assert env.forward_events()[-1]["outcome"] == "dead: attempts used up"
    assert env.forwarder().run_due() == 0  # dead jobs are not retried on their own

    pacs.start()
    assert main(["retry", "--config", str(env.config_path), "--dead"]) == 0
    out = capsys.readouterr().out
    assert f"requeued {study.study_uid} -> pacs (was dead after 2 attempt(s)" in out
    job = env.job()
    assert (job.state, job.attempts, job.permanent_failure) == (ForwardJobState.PENDING, 0, False)

    assert env.forwarder().run_due() == 1
    assert env.job().state is ForwardJobState.DELIVERED
    assert pacs.instance_count() == 3


def test_retry_by_study_uid_only_touches_that_study(
    gateway: Callable[..., Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    env = gateway(destination(free_port(), max_attempts=1))
    first, second = env.add_study(), env.add_study()
    env.forwarder().run_due()
    assert {env.job(first).state, env.job(second).state} == {ForwardJobState.DEAD}

    assert main(["retry", "--config", str(env.config_path), first.study_uid]) == 0
    assert env.job(first).state is ForwardJobState.PENDING
    assert env.job(second).state is ForwardJobState.DEAD
    assert "1 job(s) requeued" in capsys.readouterr().out

    assert main(["retry", "--config", str(env.config_path), first.study_uid]) == 0
    assert "no dead-lettered forward jobs for study" in capsys.readouterr().out
    # Neither or both of STUDY_UID and --dead, or an unknown study: usage errors.
    assert main(["retry", "--config", str(env.config_path)]) == 2
    assert main(["retry", "--config", str(env.config_path), "--dead", first.study_uid]) == 2
    assert main(["retry", "--config", str(env.config_path), "1.2.404"]) == 2
    assert main(["retry", "--config", str(env.config_path), "--dead", "--destination", "x"]) == 2


# --- refusals ----------------------------------------------------------------------------


def test_an_association_refused_by_storescp_is_dead_lettered_at_once(
    gateway: Callable[..., Gateway], storescp: Callable[..., int]
) -> None:
    port = storescp("--refuse")
    env = gateway(destination(port, ae_title="STORESCP", max_attempts=8))
    env.add_study()
    assert env.forwarder().run_due() == 1
    job = env.job()
    assert (job.state, job.attempts, job.permanent_failure) == (ForwardJobState.DEAD, 1, True)
    assert job.last_error is not None and "rejected permanently" in job.last_error
    assert env.forward_events()[-1]["outcome"] == "dead: permanent failure"


def test_a_called_ae_title_the_destination_does_not_know_is_dead_lettered_at_once(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc(ae_title="PACS", check_called_aet=True)
    env = gateway(destination(pacs.dicom_port, ae_title="NOTPACS", max_attempts=8))
    env.add_study()
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.attempts, job.permanent_failure) == (ForwardJobState.DEAD, 1, True)
    assert job.last_error is not None and "Called AE title not recognised" in job.last_error
    assert pacs.instance_count() == 0


def test_a_transient_rejection_is_retried(
    gateway: Callable[..., Gateway], store_scp: Callable[..., StoreSCP]
) -> None:
    scp = store_scp(max_associations=1)
    env = gateway(destination(scp.port, max_attempts=5))
    env.add_study()
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(DigitalXRayImageStorageForPresentation)
    held = holder.associate(HOST, scp.port, ae_title="ORTHANC")
    assert held.is_established
    try:
        env.forwarder().run_due()
        job = env.job()
        assert (job.state, job.attempts, job.permanent_failure) == (
            ForwardJobState.PENDING,
            1,
            False,
        )
        assert job.last_error is not None and "rejected transiently" in job.last_error
    finally:
        held.release()
    assert env.run_until([ForwardJobState.DELIVERED]).attempts == 2


def test_an_abort_during_a_store_is_retried(
    gateway: Callable[..., Gateway], storescp: Callable[..., int]
) -> None:
    port = storescp("--abort-during")
    env = gateway(destination(port, ae_title="STORESCP", max_attempts=5))
    env.add_study()
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.attempts, job.permanent_failure) == (ForwardJobState.PENDING, 1, False)
    assert job.last_error is not None and "aborted" in job.last_error
    assert env.delivered(job.id) == {}


def test_an_abort_mid_job_resends_only_what_was_not_confirmed(
    gateway: Callable[..., Gateway], store_scp: Callable[..., StoreSCP]
) -> None:
    scp = store_scp(abort_at=3)
    env = gateway(destination(scp.port, max_attempts=5))
    study = env.add_study(instances=2)
    job = env.run_until([ForwardJobState.DELIVERED])
    assert job.attempts == 2
    received = Counter(uid for _, uid in scp.received)
    assert set(received) == study.uids
    # The two confirmed before the abort are not sent again; the one in flight when the
    # association was aborted (no response) is, once; every other exactly once.
    assert sorted(received.values()) == [1] * (len(study.uids) - 1) + [2]
    assert set(env.delivered(job.id)) == study.uids


def test_no_response_within_the_timeout_is_retried(
    gateway: Callable[..., Gateway], store_scp: Callable[..., StoreSCP]
) -> None:
    scp = store_scp(delay_s=2.5)
    env = gateway(destination(scp.port, timeout_s=1, max_attempts=5))
    env.add_study()
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.attempts) == (ForwardJobState.PENDING, 1)
    assert job.last_error is not None and "no C-STORE response" in job.last_error
    assert len(scp.received) == 1  # the association stopped at the first silence


@pytest.mark.parametrize(
    ("status", "state", "permanent", "delivered"),
    [
        # A warning counts as delivered and is recorded with its status.
        (STATUS_WARNING_COERCION, ForwardJobState.DELIVERED, False, 3),
        # Out of resources: the destination is in trouble; stop, retry later.
        (STATUS_OUT_OF_RESOURCES, ForwardJobState.PENDING, False, 1),
        (STATUS_HANDLER_EXCEPTION, ForwardJobState.PENDING, False, 1),
        # This instance will never be accepted: the others still go, then dead.
        (STATUS_DATASET_MISMATCH, ForwardJobState.DEAD, True, 2),
        (STATUS_CANNOT_UNDERSTAND, ForwardJobState.DEAD, True, 2),
        (STATUS_SOP_CLASS_NOT_SUPPORTED, ForwardJobState.DEAD, True, 2),
    ],
    ids=lambda value: f"0x{value:04X}" if isinstance(value, int) and value > 3 else None,
)
def test_c_store_status_of_the_capture(
    gateway: Callable[..., Gateway],
    store_scp: Callable[..., StoreSCP],
    status: int,
    state: ForwardJobState,
    permanent: bool,
    delivered: int,
) -> None:
    capture_class = pydicom.uid.SecondaryCaptureImageStorage
    scp = store_scp(
        answer=lambda sop_class, uid, n: status if sop_class == capture_class else STATUS_SUCCESS
    )
    env = gateway(destination(scp.port, max_attempts=5))
    study = env.add_study()
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.permanent_failure, job.attempts) == (state, permanent, 1)
    confirmed = env.delivered(job.id)
    assert len(confirmed) == delivered
    (capture,) = study.gradcam
    if state is ForwardJobState.DELIVERED:
        assert confirmed[capture] == status
        assert env.forward_events()[-1]["warnings"] == {capture: f"0x{status:04X} (warning)"}
    else:
        assert capture not in confirmed
        assert job.last_error is not None and f"0x{status:04X}" in job.last_error
        assert capture in job.last_error
    if state is ForwardJobState.PENDING:
        # Retried: only what was not confirmed goes the second time.
        scp.answer = lambda sop_class, uid, n: STATUS_SUCCESS
        scp.received.clear()
        env.run_until([ForwardJobState.DELIVERED])
        assert {uid for _, uid in scp.received} == study.uids - set(confirmed)


def test_a_sop_class_the_destination_does_not_accept_is_refused_for_good(
    gateway: Callable[..., Gateway], store_scp: Callable[..., StoreSCP]
) -> None:
    env = gateway(destination(free_port()))
    study = env.add_study()
    ((uid, path),) = study.originals.items()
    scp = store_scp(sop_classes=[pydicom.dcmread(path).SOPClassUID])
    env.reconfigure([destination(scp.port)])
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.permanent_failure) == (ForwardJobState.DEAD, True)
    assert list(env.delivered(job.id)) == [uid]
    assert job.last_error is not None and "accepted no presentation context" in job.last_error


def test_a_missing_file_is_refused_and_the_rest_is_sent(
    gateway: Callable[..., Gateway], store_scp: Callable[..., StoreSCP]
) -> None:
    scp = store_scp()
    env = gateway(destination(scp.port))
    study = env.add_study()
    spool = Path(env.config.storage.spool_dir)
    (spool / "derived" / f"{study.report}.dcm").unlink()
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.permanent_failure) == (ForwardJobState.DEAD, True)
    assert set(env.delivered(job.id)) == study.uids - {study.report}
    assert job.last_error is not None and study.report in job.last_error


def test_a_destination_removed_from_the_configuration_is_dead_lettered(
    gateway: Callable[..., Gateway],
) -> None:
    env = gateway(destination(free_port()))
    env.add_study()
    env.reconfigure([destination(free_port(), name="other")])
    env.forwarder().run_due()
    job = env.job()
    assert (job.state, job.permanent_failure) == (ForwardJobState.DEAD, True)
    assert job.last_error == "destination 'pacs' is not in the configuration any more"


def test_status_classification() -> None:
    assert classify_status(STATUS_SUCCESS) is StatusOutcome.DELIVERED
    for warning in (0xB000, 0xB006, 0xB007, 0x0001, 0x0107):
        assert classify_status(warning) is StatusOutcome.DELIVERED, hex(warning)
    for transient in (0xA700, 0xA7FF, 0x0110, 0x0213, 0xC211, 0xFE00):
        assert classify_status(transient) is StatusOutcome.RETRY, hex(transient)
    for permanent in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0xC210, 0x0122, 0x0124):
        assert classify_status(permanent) is StatusOutcome.PERMANENT, hex(permanent)


# --- restarts: never twice, nothing lost ------------------------------------------------


def test_after_a_kill_mid_job_only_the_rest_is_sent(
    gateway: Callable[..., Gateway], orthanc: Callable[..., OrthancServer]
) -> None:
    pacs = orthanc()
    env = gateway(destination(pacs.dicom_port))
    study = env.add_study(instances=2)
    job = env.job()
    # As a process killed mid-job leaves it: claimed, two instances confirmed.
    already = sorted(study.originals)
    with env.sessions() as session, session.begin():
        claimed = session.get(ForwardJob, job.id)
        assert claimed is not None
        claimed.state = ForwardJobState.IN_PROGRESS
        for uid in already:
            session.add(
                ForwardedInstance(
                    job_id=job.id, sop_instance_uid=uid, delivered_at=datetime.now(UTC), status=0
                )
            )
    forwarder = env.forwarder()
    assert forwarder.run_due() == 0  # in progress: not claimed again
    assert forwarder.requeue_in_progress() == [job.id]
    assert forwarder.requeue_in_progress() == []
    assert forwarder.run_due() == 1

    assert env.job().state is ForwardJobState.DELIVERED
    assert set(pacs.datasets(study.study_uid)) == study.uids - set(already)
    assert pacs.instance_count() == 3
    with env.sessions() as session:
        recovery = session.scalars(select(AuditEvent).where(AuditEvent.kind == "recovery")).one()
    assert recovery.detail["job_id"] == job.id


def test_requeue_of_stale_jobs_leaves_live_ones_alone(gateway: Callable[..., Gateway]) -> None:
    env = gateway(destination(free_port()))
    env.add_study()
    job = env.job()
    now = datetime.now(UTC)
    with env.sessions() as session, session.begin():
        claimed = session.get(ForwardJob, job.id)
        assert claimed is not None
        claimed.state = ForwardJobState.IN_PROGRESS
        claimed.updated_at = now - timedelta(seconds=30)
    forwarder = env.forwarder()
    assert forwarder.requeue_in_progress(older_than_s=60, now=now) == []
    assert forwarder.requeue_in_progress(older_than_s=10, now=now) == [job.id]


def test_two_forwarders_never_claim_the_same_job(gateway: Callable[..., Gateway]) -> None:
    env = gateway(destination(free_port()))
    env.add_study()
    first, second = env.forwarder(), env.forwarder()
    claimed = first.claim_due()
    assert claimed == env.job().id
    assert second.claim_due() is None
    assert env.job().state is ForwardJobState.IN_PROGRESS


def test_instances_processed_during_an_attempt_go_next(
    gateway: Callable[..., Gateway], store_scp: Callable[..., StoreSCP]
) -> None:
    scp = store_scp()
    env = gateway(destination(scp.port))
    study = env.add_study()
    spool = Path(env.config.storage.spool_dir)
    late_uid = generate_uid()
    added: list[int] = []

    def add_late_output(number: int) -> None:
        # While the first instance is being stored, the study gets one more output.
        if number != 1:
            return
        report = pydicom.dcmread(spool / "derived" / f"{study.report}.dcm")
        report.SOPInstanceUID = late_uid
        report.file_meta.MediaStorageSOPInstanceUID = late_uid
        outputs.write_dataset(report, spool / "derived" / f"{late_uid}.dcm")
        with env.sessions() as session, session.begin():
            session.add(
                _output(
                    study.study_id,
                    None,
                    OutputKind.REPORT_SR,
                    report,
                    f"derived/{late_uid}.dcm",
                    datetime.now(UTC),
                )
            )
        added.append(number)

    scp.on_store = add_late_output
    env.forwarder().run_due()
    assert added == [1]
    job = env.job()
    assert (job.state, job.last_error) == (ForwardJobState.PENDING, None)
    assert env.forward_events()[-1]["outcome"] == "more to send"
    env.forwarder().run_due()
    assert env.job().state is ForwardJobState.DELIVERED
    assert set(env.delivered(job.id)) == {*study.uids, late_uid}
    assert [uid for _, uid in scp.received].count(late_uid) == 1
