"""Nothing acknowledged is ever lost, and nothing is processed or delivered twice.

The gateway runs as `radgate serve` (tiny model, pipeline and forwarding) or in-process
where only the receiver matters; senders are DCMTK storescu and pynetdicom (which
reports each instance's status); destinations are Orthanc (counted through its REST
API) and a pynetdicom SCP that counts every C-STORE it is sent, duplicates included.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from conftest import (
    CALLED_AET,
    HOST,
    GatewayHandle,
    ServeGateway,
    StartGateway,
    StoreSCP,
    dataset_bytes,
    echoscu,
    files_sent_as_stored,
    gateway_config,
    scu,
    send_files,
    storescu,
    wait_until,
    write_dx,
)
from orthanc import OrthancServer
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import func, select

from db.models import (
    AssociationOutcome,
    ForwardedInstance,
    ForwardJob,
    ForwardJobState,
    Prediction,
    StudyState,
)
from gateway.scp import STATUS_OUT_OF_SPACE, STATUS_SUCCESS
from gateway.spool import TEMP_PREFIX, key_digest

SUCCESS = "Success"
MIB = 1024 * 1024
# Only the originals are forwarded in these tests: the derived objects have their own
# tests, and leaving them out keeps the slow scenarios light.
ORIGINALS_ONLY = {"gradcam": False, "tag_originals": False, "structured_report": False}


# --- destinations ----------------------------------------------------------------------


def forwarding(name: str, ae_title: str, port: int) -> dict[str, Any]:
    """Configuration sections that route every study to one destination."""
    return {
        "destinations": [
            {
                "name": name,
                "ae_title": ae_title,
                "host": HOST,
                "port": port,
                "backoff_s": [0.5, 1],
                "max_attempts": 20,
            }
        ],
        "routes": [{"name": "everything", "when": {}, "forward_to": [name]}],
        "outputs": ORIGINALS_ONLY,
    }


def forwarded_counts(gateway: GatewayHandle) -> Counter[str]:
    """How many times radgate recorded each SOP Instance UID as delivered."""
    with gateway.sessions() as session:
        return Counter(session.scalars(select(ForwardedInstance.sop_instance_uid)))


def all_jobs_delivered(gateway: GatewayHandle, studies: int) -> bool:
    with gateway.sessions() as session:
        states = list(session.scalars(select(ForwardJob.state)))
    return len(states) == studies and all(s is ForwardJobState.DELIVERED for s in states)


def predictions_per_instance(gateway: GatewayHandle) -> Counter[int]:
    with gateway.sessions() as session:
        return Counter(session.scalars(select(Prediction.instance_id)))


def stays(predicate: Callable[[], bool], duration_s: float) -> bool:
    """Whether `predicate` holds at every check for `duration_s` (a 'not again' check)."""
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.1)
    return predicate()


# --- item 2: a sender that dies mid-file -----------------------------------------------


def test_sender_killed_mid_file_leaves_no_file_no_row_and_no_study(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(study={"quiet_period_s": 0.3})
    image = write_dx(tmp_path, rows=512, columns=512)
    assoc = scu("DYING").associate(HOST, gateway.port, ae_title=CALLED_AET)
    assert assoc.is_established
    try:
        context = next(
            c for c in assoc.accepted_contexts if c.abstract_syntax == image_class(image)
        )
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = context.abstract_syntax
        request.AffectedSOPInstanceUID = pydicom.dcmread(
            image, stop_before_pixels=True
        ).SOPInstanceUID
        request.Priority = 2
        request.DataSet = BytesIO(dataset_bytes(image))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        pdus = list(message.encode_msg(cast(int, context.context_id), 16384))
        assert len(pdus) > 4
        raw = assoc.dul.socket.socket
        # The command and half the data set, then the sender vanishes (no A-ABORT).
        for primitive in pdus[: len(pdus) // 2]:
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            raw.sendall(pdu.encode())
        raw.shutdown(socket.SHUT_RDWR)
    finally:
        assoc.abort()

    def dying_outcome() -> AssociationOutcome | None:
        rows = [a for a in gateway.associations() if a.calling_aet == "DYING"]
        return rows[0].outcome if rows else None

    assert wait_until(dying_outcome) is AssociationOutcome.ABORTED
    assert gateway.instances() == [] and gateway.studies() == []
    assert gateway.spool_files() == []
    assert echoscu(gateway.port).returncode == 0


def image_class(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)


# --- item 3: disk full, on a real small file system -------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs mounted for the test (root only); unmounted at teardown."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        # test_receive.py's RLIMIT_FSIZE test covers the full-disk path without root.
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave_mib: float) -> Path:
    """Fill `disk` with one file until about `leave_mib` MiB stay free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler"
    with filler.open("ab") as out:
        out.write(b"\0" * max(0, free - int(leave_mib * MIB)))
    return filler


def test_disk_full_is_out_of_resources_and_recovers_when_space_returns(
    small_disk: Path, start_gateway: StartGateway, tmp_path: Path
) -> None:
    # No watermark: the disk itself runs out (ENOSPC while writing).
    gateway = start_gateway(storage={"spool_dir": str(small_disk / "spool"), "min_free_mb": 0})
    big = write_dx(tmp_path / "in", "big.dcm", rows=1400, columns=1400)  # ~3.7 MiB
    assert big.stat().st_size > 3 * MIB
    filler = fill(small_disk, leave_mib=2)

    assert send_files(gateway.port, [big]) == [STATUS_OUT_OF_SPACE]
    outcome = storescu(gateway.port, [big])
    assert outcome.statuses and outcome.statuses[0] != SUCCESS, outcome.output
    assert gateway.instances() == []
    assert gateway.spool_files() == []  # no half-written or temporary file

    # Space comes back; the same gateway, not restarted, accepts again.
    filler.unlink()
    assert send_files(gateway.port, [big]) == [STATUS_SUCCESS]
    (row,) = gateway.instances()
    stored = gateway.spool_dir / row.spool_path
    assert dataset_bytes(stored) == dataset_bytes(big)
    assert not [p for p in gateway.spool_files() if p.name.startswith(TEMP_PREFIX)]


def test_the_watermark_refuses_before_the_disk_is_full(
    small_disk: Path, start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(storage={"spool_dir": str(small_disk / "spool"), "min_free_mb": 8})
    image = write_dx(tmp_path / "in", "image.dcm", rows=1024, columns=1024)  # 2 MiB
    filler = fill(small_disk, leave_mib=9)
    # Room for the file, but it would leave less than 8 MiB: refused, nothing written.
    assert send_files(gateway.port, [image]) == [STATUS_OUT_OF_SPACE]
    assert gateway.spool_files() == []
    stats = os.statvfs(small_disk)
    assert stats.f_bavail * stats.f_frsize > 4 * image.stat().st_size  # far from full
    filler.unlink()
    assert send_files(gateway.port, [image]) == [STATUS_SUCCESS]
    assert len(gateway.instances()) == 1


# --- item 5: duplicates, end to end ----------------------------------------------------


def test_a_duplicate_sop_instance_uid_is_kept_once_recorded_once_forwarded_once(
    serve_gateway: ServeGateway,
    store_scp: Callable[..., StoreSCP],
    tmp_path: Path,
    tiny_model: Path,
) -> None:
    destination = store_scp(ae_title="COUNTER", max_associations=20)
    setup = gateway_config(
        tmp_path / "gw",
        model={"dir": str(tiny_model), "device": "cpu"},
        study={"quiet_period_s": 0.3},
        **forwarding("counter", "COUNTER", destination.port),
    )
    gateway = serve_gateway(setup, receive_only=False)
    study_uid, sop_uid = generate_uid(), generate_uid()
    first = write_dx(tmp_path / "a", study_uid=study_uid, sop_uid=sop_uid, seed=1)
    different = write_dx(tmp_path / "b", study_uid=study_uid, sop_uid=sop_uid, seed=2)

    # Twice in one association, before processing.
    assert storescu(gateway.port, [first, first]).statuses == [SUCCESS, SUCCESS]
    wait_until(lambda: all_jobs_delivered(gateway, 1), timeout_s=120)
    # Again after delivery: the same bytes, then other bytes under the same UID.
    assert storescu(gateway.port, [first]).statuses == [SUCCESS]
    assert send_files(gateway.port, [different]) == [STATUS_SUCCESS]

    # Nothing reopens the study or sends it again (several sweep and forward rounds).
    def processed_and_sent_once() -> bool:
        study = gateway.study(study_uid)
        processed = study is not None and study.state is StudyState.PROCESSED
        return processed and len(destination.received) == 1

    assert stays(processed_and_sent_once, duration_s=4)
    assert destination.counts() == Counter({sop_uid: 1})
    (row,) = gateway.instances()
    assert dataset_bytes(gateway.spool_dir / row.spool_path) == dataset_bytes(first)
    assert len([p for p in gateway.spool_files() if "instances" in p.parts]) == 1
    assert forwarded_counts(gateway) == Counter({sop_uid: 1})
    assert list(predictions_per_instance(gateway).values()) == [1]
    assert gateway.stop() == 0


# --- item 1: SIGKILL at random points while receiving ----------------------------------


@dataclass
class Sent:
    path: Path
    sop_uid: str
    study_uid: str
    acknowledged: bool = False


class ResendingSender:
    """A modality in a thread: sends each instance over pynetdicom, reconnects when the
    gateway goes away, and resends what did not get Success (as a modality would)."""

    def __init__(self, port: int, items: list[Sent]) -> None:
        self.port = port
        self.items = items
        self.sends = 0  # C-STORE requests made, resends included
        self.thread = threading.Thread(target=self._run, name="resending-sender", daemon=True)
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self._stop.set()
            raise AssertionError("the sender did not finish")
        if self.error is not None:
            raise self.error

    @property
    def done(self) -> int:
        return sum(item.acknowledged for item in self.items)

    def _run(self) -> None:
        try:
            ae = scu("MODALITY", timeout_s=10)
            with files_sent_as_stored():
                while not self._stop.is_set():
                    pending = [item for item in self.items if not item.acknowledged]
                    if not pending:
                        return
                    assoc = ae.associate(HOST, self.port, ae_title=CALLED_AET)
                    if not assoc.is_established:
                        time.sleep(0.2)  # the gateway is restarting
                        continue
                    for item in pending:
                        self.sends += 1
                        try:
                            response = assoc.send_c_store(item.path)
                        except (RuntimeError, OSError):
                            break
                        if not assoc.is_established or "Status" not in response:
                            break
                        if int(response.Status) == STATUS_SUCCESS:
                            item.acknowledged = True
                    if assoc.is_established:
                        assoc.release()
                    else:
                        assoc.abort()
        except BaseException as error:  # reported by join()
            self.error = error


@pytest.mark.slow
def test_sigkill_while_receiving_loses_nothing_acknowledged(
    serve_gateway: ServeGateway,
    orthanc: Callable[..., OrthancServer],
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pacs = orthanc(ae_title="PACS")
    setup = gateway_config(
        tmp_path / "gw",
        model={"dir": str(tiny_model), "device": "cpu"},
        study={"quiet_period_s": 0.3, "unreleased_timeout_s": 2},
        **forwarding("pacs", "PACS", pacs.dicom_port),
    )
    items = []
    for study in range(100):
        study_uid = generate_uid()
        for number in range(3):
            sop_uid = generate_uid()
            path = write_dx(
                tmp_path / "in", sop_uid=sop_uid, study_uid=study_uid, seed=study * 3 + number
            )
            items.append(Sent(path, sop_uid, study_uid))
    gateway = serve_gateway(setup, receive_only=False)
    sender = ResendingSender(gateway.port, items)
    sender.start()
    chance = random.Random(20261125)
    kills = 0
    # Kill at a random moment once every tenth of the instances has been acknowledged
    # since the last start, three times, then let everything finish.
    while kills < 3 and sender.thread.is_alive():
        target = sender.done + 20
        wait_until(lambda target=target: sender.done >= target or not sender.thread.is_alive(), 120)
        time.sleep(chance.uniform(0.0, 0.5))
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait(30)
        kills += 1
        gateway = serve_gateway(setup, receive_only=False)
    sender.join(timeout_s=300)
    assert kills == 3 and sender.done == len(items)

    wait_until(lambda: all_jobs_delivered(gateway, 100), timeout_s=300)
    assert echoscu(gateway.port).returncode == 0

    rows = {row.sop_instance_uid: row for row in gateway.instances()}
    assert len(rows) == len(gateway.instances()) == len(items)  # in the database once
    for item in items:
        row = rows[item.sop_uid]
        stored = gateway.spool_dir / row.spool_path
        assert dataset_bytes(stored) == dataset_bytes(item.path), item.sop_uid
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
    # A kill between writing a file and committing its row leaves an orphan copy (the
    # sender got no Success for it and sent it again); it may only be such a copy.
    referenced = {row.spool_path for row in rows.values()}
    digests = {key_digest(item.sop_uid) for item in items}
    orphans = 0
    for path in gateway.spool_files():
        relative = path.relative_to(gateway.spool_dir).as_posix()
        assert not path.name.startswith(TEMP_PREFIX), relative
        if relative.startswith("instances/") and relative not in referenced:
            assert path.name.split("-")[0] in digests, relative
            orphans += 1

    predictions = predictions_per_instance(gateway)
    assert len(predictions) == len(items) and set(predictions.values()) == {1}  # once each
    with gateway.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == len(items)
    assert forwarded_counts(gateway) == Counter({item.sop_uid: 1 for item in items})
    assert pacs.instance_count() == len(items)
    assert {uid for study in {i.study_uid for i in items} for uid in pacs.datasets(study)} == {
        item.sop_uid for item in items
    }
    assert gateway.stop() == 0
    with capsys.disabled():
        print(
            f"\nSIGKILL x{kills}: {sender.sends} C-STOREs for {len(items)} instances,"
            f" {orphans} orphan spool copies"
        )


# --- item 15: load ----------------------------------------------------------------------


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.mark.slow
def test_eight_concurrent_senders_of_100_images_each(
    serve_gateway: ServeGateway,
    store_scp: Callable[..., StoreSCP],
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    senders, per_sender, per_study = 8, 100, 4
    destination = store_scp(ae_title="COUNTER", max_associations=20)
    setup = gateway_config(
        tmp_path / "gw",
        model={"dir": str(tiny_model), "device": "cpu"},
        study={"quiet_period_s": 0.5},
        ae={"max_associations": 16},
        **forwarding("counter", "COUNTER", destination.port),
    )
    batches: list[list[Path]] = []
    for sender in range(senders):
        folder = tmp_path / f"sender{sender}"
        files = []
        for study in range(per_sender // per_study):
            study_uid = generate_uid()
            for number in range(per_study):
                files.append(
                    write_dx(folder, study_uid=study_uid, seed=sender * 1000 + study * 10 + number)
                )
        batches.append(files)
    gateway = serve_gateway(setup, receive_only=False)
    idle_mib = _peak_rss_mib(gateway.process.pid)
    started = time.monotonic()
    outcomes: list[Any] = [None] * senders

    def send(index: int) -> None:
        outcomes[index] = storescu(
            gateway.port, batches[index], calling_aet=f"MODALITY{index}", timeout_s=300
        )

    threads = [threading.Thread(target=send, args=(index,)) for index in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(320)
    received_s = time.monotonic() - started
    for outcome, batch in zip(outcomes, batches, strict=True):
        assert outcome is not None
        assert outcome.statuses == [SUCCESS] * len(batch), outcome.output[-2000:]

    total, studies = senders * per_sender, senders * per_sender // per_study
    wait_until(lambda: all_jobs_delivered(gateway, studies), timeout_s=600, interval_s=0.5)
    delivered_s = time.monotonic() - started
    peak_mib = _peak_rss_mib(gateway.process.pid)

    sent_uids = {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for batch in batches
        for path in batch
    }
    assert {row.sop_instance_uid for row in gateway.instances()} == sent_uids
    assert len(gateway.instances()) == total
    predictions = predictions_per_instance(gateway)
    assert len(predictions) == total and set(predictions.values()) == {1}
    assert destination.counts() == Counter({uid: 1 for uid in sent_uids})
    assert forwarded_counts(gateway) == Counter({uid: 1 for uid in sent_uids})
    assert "database is locked" not in gateway.log()
    assert gateway.stop() == 0
    with capsys.disabled():
        print(
            f"\nload: {senders} x {per_sender} images received in {received_s:.1f} s,"
            f" processed and delivered in {delivered_s:.1f} s; gateway peak RSS {peak_mib:.0f} MiB"
            f" ({idle_mib:.0f} MiB once started)"
        )
