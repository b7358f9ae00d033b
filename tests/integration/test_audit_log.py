"""The audit log and the logs: who sent what, where it went, and no patient data in logs.

- Every association is an `association` audit event (ATNA 110104, DICOM Instances
  Transferred): peer AE title, address, instances, outcome; every refusal a `security`
  event (110113); every forward attempt a `forward` event; `radgate audit` lists them.
- Patient names and IDs never appear in the gateway's log at INFO, through receiving,
  refusals, the gate, inference, outputs and forwarding (delivered and dead-lettered).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import (
    HOST,
    SUBPROCESS_TIMEOUT_S,
    ServeGateway,
    StartGateway,
    associated,
    dcmtk,
    dx_dataset,
    echoscu,
    free_port,
    gateway_config,
    save_as_is,
    send_files,
    storescu,
    wait_for_port,
    wait_until,
    write_dx,
)
from pydicom.uid import generate_uid

from db.models import ForwardJobState, StudyState
from gateway.cli import main
from gateway.pipeline import Pipeline
from gateway.service import pipeline_processor

SUCCESS = "Success"
PROCESSING_DEADLINE_S = 90.0
# Searchable on purpose: no log line can contain them by chance.
PATIENT_NAME = "Zzyzx^Quartermaine"
PATIENT_ID = "PHI-TEST-123456"
PATIENT_DATA = re.compile(r"zzyzx|quartermaine|phi-test-123456", re.IGNORECASE)


def audit_lines(config_path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    capsys.readouterr()
    assert main(["audit", "--config", str(config_path), *options]) == 0
    return capsys.readouterr().out


# --- associations in the audit log ---------------------------------------------------------


def test_each_association_is_audited_with_peer_instances_and_outcome(
    start_gateway: StartGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = start_gateway(ae={"allowed_calling_aets": ["MODALITY1", "PYNETDICOM"]})
    images = [write_dx(tmp_path / "a", seed=seed) for seed in range(2)]
    assert storescu(gateway.port, images, calling_aet="MODALITY1").statuses == [SUCCESS] * 2
    with associated(gateway.port, release=False) as assoc:
        assoc.send_c_store(dx_dataset())
    assert echoscu(gateway.port, calling_aet="INTRUDER").returncode != 0

    def ended() -> list[dict[str, object]] | None:
        events = [event.detail for event in gateway.audit_events("association")]
        return events if len(events) == 2 else None

    released, aborted = wait_until(ended)
    assert released["atna_event_id"] == "110104"
    assert (released["calling_aet"], released["called_aet"]) == ("MODALITY1", "RADGATE")
    assert released["peer_host"] == HOST and isinstance(released["peer_port"], int)
    assert (released["instances"], released["outcome"]) == (2, "released")
    assert (aborted["calling_aet"], aborted["instances"], aborted["outcome"]) == (
        "PYNETDICOM",
        1,
        "aborted",
    )
    (security,) = wait_until(lambda: [event.detail for event in gateway.audit_events("security")])
    assert (security["calling_aet"], security["peer_host"]) == ("INTRUDER", HOST)

    text = audit_lines(gateway.setup.path, capsys)
    lines = text.splitlines()
    assert len(lines) == 3, text
    # Newest first.
    assert "security" in lines[0] and "INTRUDER at 127.0.0.1" in lines[0]
    assert "Calling AE title not recognised" in lines[0]
    assert "PYNETDICOM at 127.0.0.1" in lines[1] and "aborted, 1 instance(s)" in lines[1]
    assert "MODALITY1 at 127.0.0.1" in lines[2] and "released, 2 instance(s)" in lines[2]

    only_security = audit_lines(gateway.setup.path, capsys, "--kind", "security", "--json")
    events = json.loads(only_security)["events"]
    assert [event["kind"] for event in events] == ["security"]
    assert events[0]["detail"]["atna_event_id"] == "110113"
    assert audit_lines(gateway.setup.path, capsys, "--since", "2999-01-01") == "no audit events\n"


def test_audit_refuses_a_since_that_is_not_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = gateway_config(tmp_path / "gw")
    assert main(["audit", "--config", str(setup.path), "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is not a date or time" in capsys.readouterr().err


# --- no patient data in the logs -----------------------------------------------------------


@pytest.fixture
def storescp_sink(tmp_path: Path) -> Iterator[Callable[[], tuple[int, Path]]]:
    """DCMTK storescp accepting everything; returns (port, folder of received files)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[int, Path]:
        port = free_port()
        folder = tmp_path / f"sink{len(processes)}"
        folder.mkdir()
        process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "SINK", "-od", str(folder), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_for_port(HOST, port, alive=lambda: process.poll() is None)
        return port, folder

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(SUBPROCESS_TIMEOUT_S)


def test_patient_names_and_ids_never_reach_the_log(
    serve_gateway: ServeGateway,
    storescp_sink: Callable[[], tuple[int, Path]],
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink_port, sink = storescp_sink()
    down_port = free_port()  # nothing listens: every attempt fails
    setup = gateway_config(
        tmp_path / "gw",
        # WAITFOR: the readiness check of serve_gateway.
        ae={"allowed_calling_aets": ["MODALITY1", "PYNETDICOM", "WAITFOR"]},
        model={"dir": str(tiny_model), "device": "cpu"},
        destinations=[
            {"name": "pacs", "ae_title": "SINK", "host": HOST, "port": sink_port},
            {
                "name": "down",
                "ae_title": "DOWN",
                "host": HOST,
                "port": down_port,
                "max_attempts": 1,
                "timeout_s": 5,
            },
        ],
        routes=[{"name": "all", "when": {}, "forward_to": ["pacs", "down"]}],
    )
    gateway = serve_gateway(setup, receive_only=False)
    patient = {"patient_name": PATIENT_NAME, "patient_id": PATIENT_ID}
    study_uid = generate_uid()
    sop_uid = generate_uid()
    chest = write_dx(tmp_path / "in", study_uid=study_uid, sop_uid=sop_uid, seed=1, **patient)
    ct = dx_dataset(study_uid=study_uid, seed=2, **patient)
    ct.Modality = "CT"  # rejected by the gate, with its reason logged
    ct_path = save_as_is(ct, tmp_path / "in" / "ct.dcm")
    # A resend with other bytes (logged as a warning) and a data set without a study.
    different = write_dx(
        tmp_path / "again", study_uid=study_uid, sop_uid=sop_uid, seed=3, **patient
    )
    no_study = dx_dataset(**patient)
    del no_study.StudyInstanceUID
    no_study_path = save_as_is(no_study, tmp_path / "in" / "no-study.dcm")
    # Values pydicom and highdicom find invalid: their complaints must not quote them.
    odd_study_uid = generate_uid()
    odd = dx_dataset(
        study_uid=odd_study_uid, patient_name=PATIENT_NAME + "\x07", patient_id=PATIENT_ID + "\x01"
    )
    odd.PatientBirthDate = PATIENT_ID
    odd_path = save_as_is(odd, tmp_path / "in" / "odd.dcm")

    sent = storescu(gateway.port, [chest, ct_path, odd_path], calling_aet="MODALITY1")
    assert sent.statuses == [SUCCESS] * 3, sent.output
    assert send_files(gateway.port, [different, no_study_path])[0] == 0
    assert storescu(gateway.port, [chest], calling_aet="STRANGER").rejected

    gateway.wait_for_state(study_uid, StudyState.PROCESSED, PROCESSING_DEADLINE_S)
    gateway.wait_for_state(odd_study_uid, StudyState.PROCESSED, PROCESSING_DEADLINE_S)

    def forwarding_done() -> dict[tuple[str, str], str] | None:
        states = {
            (str(event.study_uid), event.detail["destination"]): event.detail["state"]
            for event in gateway.audit_events("forward")
        }
        finished = {ForwardJobState.DELIVERED.value, ForwardJobState.DEAD.value}
        done = len(states) == 4 and set(states.values()) <= finished
        return states if done else None

    states = wait_until(forwarding_done, PROCESSING_DEADLINE_S)
    assert states == {
        (uid, destination): state
        for uid in (study_uid, odd_study_uid)
        for destination, state in (("pacs", "delivered"), ("down", "dead"))
    }
    delivered = [pydicom.dcmread(path) for path in sorted(sink.iterdir())]
    assert PATIENT_NAME in {str(ds.PatientName) for ds in delivered}
    assert gateway.stop(signal.SIGTERM) == 0

    log = gateway.log()
    # The log covers what happened, at INFO and above ...
    for expected in (
        "radgate serving AE RADGATE",
        "association from MODALITY1 (127.0.0.1) released",
        "differs from the first copy",
        "StudyInstanceUID is missing",
        f"study {study_uid} processed: 2 instance(s), 1 classified",
        "forward job",
        "radgate stopped",
    ):
        assert expected in log, f"{expected!r} not in the log:\n{log}"
    assert " DEBUG " not in log
    # ... and never names the patient.
    leaks = [line for line in log.splitlines() if PATIENT_DATA.search(line)]
    assert leaks == [], "patient data in the log:\n" + "\n".join(leaks)
    # Nor does the audit log, which lists both forwards.
    forwards = audit_lines(setup.path, capsys, "--kind", "forward")
    assert "-> pacs (SINK at 127.0.0.1" in forwards and "delivered" in forwards
    assert "-> down (DOWN at 127.0.0.1" in forwards and "dead" in forwards
    everything = audit_lines(setup.path, capsys, "--json", "--limit", "1000")
    assert PATIENT_DATA.search(everything) is None


def test_a_study_failure_quoting_the_patient_is_logged_and_recorded_redacted(
    start_gateway: StartGateway,
    tiny_model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(pipeline: Pipeline, study_id: int) -> None:
        # As a library that quotes the value it refuses would.
        raise ValueError(f"cannot use {PATIENT_NAME!r} (patient {PATIENT_ID})")

    monkeypatch.setattr(Pipeline, "_process", fail)
    with caplog.at_level(logging.INFO):
        gateway = start_gateway(
            model={"dir": str(tiny_model), "device": "cpu"}, processor_factory=pipeline_processor
        )
        study_uid = generate_uid()
        image = write_dx(
            tmp_path, study_uid=study_uid, patient_name=PATIENT_NAME, patient_id=PATIENT_ID
        )
        assert storescu(gateway.port, [image]).statuses == [SUCCESS]
        study = gateway.wait_for_state(study_uid, StudyState.FAILED, PROCESSING_DEADLINE_S)

    assert study.error == "ValueError: cannot use '<redacted>' (patient <redacted>)"
    assert f"failed: {study.error}" in caplog.text
    assert PATIENT_DATA.search(caplog.text) is None
    assert study.patient_name == PATIENT_NAME  # the database keeps it
