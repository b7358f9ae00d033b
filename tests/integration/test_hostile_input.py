"""Hostile and odd input: malformed files, raw-socket misbehaviour, too many callers,
and configuration or model files that try to run code.

The gateway runs as a real process (`radgate serve`, or the same service without the
model where no processing is needed); senders are DCMTK, pynetdicom and raw sockets.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import (
    CALLED_AET,
    DX_SOP_CLASS,
    HOST,
    REPO,
    ServeGateway,
    StartGateway,
    associated,
    dx_dataset,
    echoscu,
    files_sent_as_stored,
    gateway_config,
    save_as_is,
    scu,
    send_files,
    storescu,
    wait_until,
    write_dx,
)
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from db.models import AssociationOutcome, Instance, StudyState
from gateway.scp import STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS
from inference.artifact import WEIGHTS_FILE

SUCCESS = "Success"
# How deep the hostile sequence nests: far past Python's recursion limit.
NESTING_DEPTH = 5000
MIB = 1024 * 1024


# --- item 8: malformed files -----------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A hostile file and what the gateway must make of it once acknowledged."""

    name: str
    path: Path
    # The gate's reasons for a rejection; None: the image is valid and gets classified.
    reasons: tuple[str, ...] | None
    # The C-STORE status; only a Success reaches the gate.
    status: int = STATUS_SUCCESS


def _nested_sequence(depth: int) -> bytes:
    """(0008,1140) Referenced Image Sequence nested `depth` deep, undefined lengths
    (explicit VR little endian), written by hand: pydicom itself cannot write it."""
    opening = (
        struct.pack("<HH", 0x0008, 0x1140)
        + b"SQ\0\0"
        + b"\xff\xff\xff\xff"
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    )
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def _nested(folder: Path, study_uid: str, depth: int) -> Path:
    ds = dx_dataset(study_uid=study_uid)
    low, high = Dataset(), Dataset()
    for element in ds:
        (low if element.tag < 0x00081140 else high).add(element)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, low)
    body.write(_nested_sequence(depth))
    write_dataset(body, high)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path = folder / f"nested-{depth}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue())
    return path


def malformed_files(folder: Path) -> list[Malformed]:
    """One file per kind of hostile input, each in its own study."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Malformed] = []

    def add(name: str, ds: Dataset, reasons: tuple[str, ...] | None) -> None:
        files.append(Malformed(name, save_as_is(ds, folder / f"{name}.dcm"), reasons))

    valid = write_dx(folder, "valid-source.dcm")
    data = valid.read_bytes()
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 3000])
    files.append(Malformed("truncated", truncated, ("pixel data truncated",)))

    short = dx_dataset()
    short.PixelData = short.PixelData[:100]
    add("pixel-data-short", short, ("pixel data truncated",))

    no_pixels = dx_dataset()
    del no_pixels.PixelData
    add("no-pixel-data", no_pixels, ("no pixel data",))

    absurd = dx_dataset()
    absurd.Rows = absurd.Columns = 65535
    add("65535x65535", absurd, ("image 65535x65535 too large",))

    odd_bits = dx_dataset()
    odd_bits.BitsAllocated = 12
    add("bits-allocated-12", odd_bits, ("BitsAllocated 12 not supported",))

    # Nesting as deep as real files have is fine; thousands deep cannot be parsed.
    files.append(Malformed("nested-20", _nested(folder, generate_uid(), 20), None))
    files.append(
        Malformed(
            "nested-5000",
            _nested(folder, generate_uid(), NESTING_DEPTH),
            None,
            STATUS_CANNOT_UNDERSTAND,
        )
    )

    private = dx_dataset()
    block = private.private_block(0x0029, "UNKNOWN VENDOR 7", create=True)
    block.add_new(0x10, "OB", b"\x01\x02" * 50)
    block.add_new(0x11, "UN", b"\xfe\xff" * 20)
    private.add_new(0x00991010, "LO", "no creator for this one")
    add("private-tags", private, None)

    for charset, name in [
        ("ISO_IR 100", "Müller^Jörg"),
        ("ISO_IR 192", "Ωμέγα^Άλφα=山田^太郎"),
        ("ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
    ]:
        ds = dx_dataset(patient_name=name)
        ds.SpecificCharacterSet = ["", charset] if charset.startswith("ISO 2022") else charset
        add(f"charset-{charset.replace(' ', '_')}", ds, None)

    j2k = dx_dataset()
    j2k.file_meta.TransferSyntaxUID = JPEG2000Lossless
    j2k.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00garbage" * 64])
    j2k["PixelData"].VR = "OB"
    j2k["PixelData"].is_undefined_length = True
    add("jpeg2000-undecodable", j2k, ("pixel data does not decode",))
    return files


def _with_new_uids(files: list[Malformed], folder: Path) -> list[Malformed]:
    """The same files under new Study and SOP Instance UIDs (a second sender)."""

    folder.mkdir(parents=True, exist_ok=True)
    renamed = []
    for item in files:
        if item.name == "truncated" or item.name.startswith("nested"):
            # Rewriting would repair (or could not read) them: built again instead.
            if item.name.startswith("nested"):
                depth = int(item.name.split("-")[1])
                path = _nested(folder, generate_uid(), depth)
            else:
                data = write_dx(folder, "valid-source.dcm").read_bytes()
                path = folder / "truncated.dcm"
                path.write_bytes(data[: len(data) - 3000])
            renamed.append(Malformed(item.name, path, item.reasons, item.status))
            continue
        ds = pydicom.dcmread(item.path, force=True)
        ds.StudyInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        renamed.append(
            Malformed(item.name, save_as_is(ds, folder / item.path.name), item.reasons, item.status)
        )
    return renamed


def send_as_stored(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file byte for byte over one pynetdicom association that proposes
    the uncompressed syntaxes and JPEG 2000; the status of each."""
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(DX_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(DX_SOP_CLASS, JPEG2000Lossless)
    assoc = ae.associate(HOST, port, ae_title=CALLED_AET)
    assert assoc.is_established
    statuses = []
    try:
        with files_sent_as_stored():
            for path in files:
                response = assoc.send_c_store(path)
                assert "Status" in response, f"no C-STORE response for {path.name}"
                statuses.append(int(response.Status))
    finally:
        assoc.release()
    return statuses


def _sop_uid(path: Path) -> str:
    """From the file meta only: the data set of some of these files cannot be parsed."""
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def test_malformed_files_get_a_status_or_a_gate_reason_and_the_gateway_carries_on(
    serve_gateway: ServeGateway, tmp_path: Path, tiny_model: Path
) -> None:
    setup = gateway_config(
        tmp_path / "gw",
        model={"dir": str(tiny_model), "device": "cpu"},
        study={"quiet_period_s": 0.3},
    )
    gateway = serve_gateway(setup, receive_only=False)
    by_pynetdicom = malformed_files(tmp_path / "pynetdicom")
    by_storescu = _with_new_uids(by_pynetdicom, tmp_path / "storescu")

    statuses = send_as_stored(gateway.port, [item.path for item in by_pynetdicom])
    assert statuses == [item.status for item in by_pynetdicom], list(
        zip([i.name for i in by_pynetdicom], statuses, strict=True)
    )
    assert gateway.alive() and echoscu(gateway.port).returncode == 0, gateway.log()

    # DCMTK reads each file before sending: one association per file, so that a file
    # it cannot read only costs that file.
    acknowledged = [item for item in by_pynetdicom if item.status == STATUS_SUCCESS]
    unread_by_storescu = []
    for item in by_storescu:
        # -xv: propose JPEG 2000 lossless (storescu proposes what the file has only when told).
        extra = ["-xv"] if item.name.startswith("jpeg2000") else []
        outcome = storescu(gateway.port, [item.path], extra=extra)
        assert gateway.alive(), gateway.log()
        if not outcome.statuses:
            # storescu could not read the file itself; nothing reached the gateway.
            unread_by_storescu.append(item.name)
        elif item.status == STATUS_SUCCESS:
            assert outcome.statuses == [SUCCESS], (item.name, outcome.output)
            acknowledged.append(item)
        elif outcome.statuses == [SUCCESS]:
            # DCMTK re-encodes the nesting with explicit lengths, which the receiver
            # need not parse: stored, and then it must get through the pipeline too.
            assert item.name == "nested-5000", (item.name, outcome.output)
            acknowledged.append(item)
        assert echoscu(gateway.port).returncode == 0, gateway.log()
    assert set(unread_by_storescu) <= {"truncated", "nested-5000"}, unread_by_storescu

    uids = {_sop_uid(item.path): item for item in acknowledged}

    def all_processed() -> bool:
        studies = gateway.studies()
        return len(studies) == len(uids) and all(
            s.state in (StudyState.PROCESSED, StudyState.FAILED) for s in studies
        )

    wait_until(all_processed, timeout_s=120)
    assert {s.state for s in gateway.studies()} == {StudyState.PROCESSED}, [
        (s.study_uid, s.error) for s in gateway.studies()
    ]
    with gateway.sessions() as session:
        rows = session.scalars(
            select(Instance).options(
                selectinload(Instance.gate_decision), selectinload(Instance.prediction)
            )
        ).all()
        outcomes = {row.sop_instance_uid: (row.gate_decision, row.prediction) for row in rows}
    assert set(outcomes) == set(uids)
    for uid, item in uids.items():
        decision, prediction = outcomes[uid]
        assert decision is not None, item.name
        if item.status != STATUS_SUCCESS:
            # Refused by the pynetdicom path, stored by the DCMTK one: either outcome
            # of the gate, with a reason when rejected.
            assert decision.passed == (prediction is not None), item.name
            assert decision.passed or decision.reasons, item.name
        elif item.reasons is None:
            assert decision.passed, (item.name, decision.reasons)
            assert prediction is not None and prediction.label in ("chest", "abd")
        else:
            assert not decision.passed, item.name
            assert tuple(decision.reasons) == item.reasons, item.name
            assert prediction is None
    assert gateway.alive() and echoscu(gateway.port).returncode == 0
    assert gateway.stop() == 0


# --- item 9: raw sockets ---------------------------------------------------------------


def _rss_kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the gateway closes `sock` within `timeout_s` (reads until EOF or reset)."""
    sock.settimeout(timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def _stream(raw: socket.socket, header: bytes, total_mib: int) -> None:
    """Send `header`, then up to `total_mib` MiB of zeros, until the gateway closes."""
    chunk = b"\0" * MIB
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.sendall(header)
        for _ in range(total_mib):
            raw.sendall(chunk)


def test_oversized_association_request_is_dropped_without_buffering_it(
    serve_gateway: ServeGateway, tmp_path: Path
) -> None:
    setup = gateway_config(tmp_path / "gw", ae={"network_timeout_s": 2, "acse_timeout_s": 2})
    gateway = serve_gateway(setup)
    before = _rss_kib(gateway.process.pid)
    with socket.create_connection((HOST, gateway.port)) as raw:
        raw.settimeout(30)
        # An A-ASSOCIATE-RQ announcing 4 GiB - 1 bytes, and a sender that keeps going.
        _stream(raw, struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFFF), total_mib=256)
        assert _closed_by_peer(raw, timeout_s=30), "the oversized request was never dropped"
    grown_mib = (_rss_kib(gateway.process.pid) - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
    # Meanwhile, and after, other senders are served.
    assert send_files(gateway.port, [write_dx(tmp_path / "in")]) == [STATUS_SUCCESS]
    assert gateway.alive() and echoscu(gateway.port).returncode == 0
    assert len(gateway.instances()) == 1


def test_stalled_association_request_times_out_while_others_are_served(
    serve_gateway: ServeGateway, tmp_path: Path
) -> None:
    setup = gateway_config(tmp_path / "gw", ae={"network_timeout_s": 2, "acse_timeout_s": 2})
    gateway = serve_gateway(setup)
    with socket.create_connection((HOST, gateway.port)) as raw:
        # A plausible A-ASSOCIATE-RQ length, 100 bytes of it, then nothing.
        raw.sendall(struct.pack(">BBL", 0x01, 0x00, 4000) + b"\0" * 100)
        assert send_files(gateway.port, [write_dx(tmp_path / "in")]) == [STATUS_SUCCESS]
        assert echoscu(gateway.port).returncode == 0
        assert _closed_by_peer(raw, timeout_s=30), "the stalled connection was never dropped"
    assert gateway.alive() and echoscu(gateway.port).returncode == 0
    assert len(gateway.instances()) == 1


def test_data_pdu_longer_than_the_maximum_is_dropped_without_buffering_it(
    serve_gateway: ServeGateway, tmp_path: Path
) -> None:
    setup = gateway_config(tmp_path / "gw", ae={"max_pdu": 16384, "network_timeout_s": 2})
    gateway = serve_gateway(setup)
    before = _rss_kib(gateway.process.pid)
    assoc = scu("FLOODER").associate(HOST, gateway.port, ae_title=CALLED_AET)
    assert assoc.is_established
    try:
        raw = assoc.dul.socket.socket
        _stream(raw, struct.pack(">BBL", 0x04, 0x00, 1 << 30), total_mib=256)
        wait_until(lambda: assoc.is_aborted, timeout_s=20)
    finally:
        assoc.abort()
    grown_mib = (_rss_kib(gateway.process.pid) - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
    # Senders that keep to the maximum (128 KiB images in 16 KiB PDUs) are served.
    image = write_dx(tmp_path / "in", "a.dcm", rows=256, columns=256)
    assert send_files(gateway.port, [image]) == [STATUS_SUCCESS]
    other = write_dx(tmp_path / "in", "b.dcm", rows=256, columns=256)
    assert storescu(gateway.port, [other]).statuses == [SUCCESS]
    assert gateway.alive() and echoscu(gateway.port).returncode == 0
    assert len(gateway.instances()) == 2


def test_sender_stalling_mid_pdu_is_dropped_and_nothing_is_kept(
    serve_gateway: ServeGateway, tmp_path: Path
) -> None:
    setup = gateway_config(tmp_path / "gw", ae={"network_timeout_s": 2})
    gateway = serve_gateway(setup)
    assoc = scu("STALLER").associate(HOST, gateway.port, ae_title=CALLED_AET)
    assert assoc.is_established
    try:
        raw = assoc.dul.socket.socket
        # A P-DATA-TF PDU announcing 1 MiB, of which 100 bytes arrive.
        raw.sendall(struct.pack(">BBL", 0x04, 0x00, 1 << 20) + b"\0" * 100)
        assert send_files(gateway.port, [write_dx(tmp_path / "in")]) == [STATUS_SUCCESS]
        # Dropped by the gateway's network timeout (2 s), long before this side's (30 s).
        wait_until(lambda: assoc.is_aborted, timeout_s=20)
    finally:
        assoc.abort()

    def staller_outcome() -> AssociationOutcome | None:
        rows = [a for a in gateway.associations() if a.calling_aet == "STALLER"]
        return rows[0].outcome if rows else None

    assert wait_until(staller_outcome) is AssociationOutcome.ABORTED
    assert len(gateway.instances()) == 1
    assert gateway.alive() and echoscu(gateway.port).returncode == 0


# --- item 10: more associations than allowed -------------------------------------------


def test_associations_beyond_the_maximum_are_rejected_and_the_others_complete(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(ae={"max_associations": 2})
    images = [write_dx(tmp_path, seed=seed) for seed in range(4)]
    with associated(gateway.port) as first, associated(gateway.port) as second:
        extra = scu().associate(HOST, gateway.port, ae_title=CALLED_AET)
        assert extra.is_rejected
        rejection = extra.acceptor.primitive
        # Rejected transient, by the service provider (presentation): local limit exceeded.
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        refused = storescu(gateway.port, [images[3]])
        assert refused.rejected and refused.statuses == [], refused.output
        assert first.send_c_store(images[0]).Status == STATUS_SUCCESS
        assert second.send_c_store(images[1]).Status == STATUS_SUCCESS
    # Capacity is back once they are released.
    assert storescu(gateway.port, [images[2]]).statuses == [SUCCESS]
    assert {row.sop_instance_uid for row in gateway.instances()} == {
        _sop_uid(path) for path in images[:3]
    }
    rejected = [a for a in gateway.associations() if a.outcome is AssociationOutcome.REJECTED]
    assert len(rejected) == 2
    assert all("limit" in (a.reason or "").lower() for a in rejected), [a.reason for a in rejected]


# --- item 11: configuration and model files that try to run code -----------------------


def _serve(config: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`radgate serve` expected to refuse to start: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_yaml_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "yaml-code-ran"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"ae:\n  title: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8"
    )
    refused = _serve(config)
    assert refused.returncode == 2, refused.stderr
    assert "ae.title" in refused.stderr or "python/object" in refused.stderr, refused.stderr
    assert not marker.exists()


def test_unknown_key_is_refused_at_start_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("ae:\n  title: RADGATE\n  max_asociations: 4\n", encoding="utf-8")
    refused = _serve(config)
    assert refused.returncode == 2
    assert "ae.max_asociations" in refused.stderr, refused.stderr


class _WritesMarker:
    """Unpickling this creates `path`: proof that pickled code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("tampering", ["flipped-byte", "pickle"])
def test_tampered_or_pickled_weights_are_refused_at_start(
    tmp_path: Path, tiny_model: Path, tampering: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / WEIGHTS_FILE
    marker = tmp_path / "pickle-ran"
    if tampering == "pickle":
        weights.write_bytes(pickle.dumps(_WritesMarker(marker)))
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    setup = gateway_config(tmp_path / "gw", model={"dir": str(model), "device": "cpu"})
    refused = _serve(setup.path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "sha256" in refused.stderr and "does not match" in refused.stderr, refused.stderr
    assert not marker.exists()
    # Nothing listened: the refusal came before the receiver started.
    with pytest.raises(OSError):
        socket.create_connection((HOST, setup.port), timeout=1).close()
