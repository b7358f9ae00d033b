"""The DICOM receiver: C-ECHO, and C-STORE into the spool and the database.

A C-STORE gets Success only once the data set is durable in the spool (file and
folder flushed) and its `instances` row is committed; nothing slow happens here (no
pixel decoding, no inference): the scheduler hands complete studies to the pipeline.

Duplicate policy: the first copy of a SOP Instance UID is kept. A resend is
acknowledged with Success, its new file deleted, and no second row written; a resend
whose bytes differ from the first copy is logged as a warning.

The handlers are plain functions bound with `evt_handlers`; everything they need
arrives in a `ReceiverContext` passed as the handler argument.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    StoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import AssociationOutcome
from db.work import (
    ReceivedInstance,
    close_association,
    open_association,
    record_instance,
    record_rejected_association,
)
from gateway.config import AEConfig
from gateway.metrics import GatewayMetrics
from gateway.security import (
    PeerPolicy,
    record_security_alert,
    refusal_reason,
    start_gateway_server,
)
from gateway.spool import Spool, SpoolError, SpoolFull

log = logging.getLogger(__name__)

# --- C-STORE response statuses (PS3.4 B.2.3 for storage, PS3.7 C for general ones) -----

# Success: the instance is durable in the spool and recorded (or was already).
STATUS_SUCCESS = int(Status.SUCCESS)
# Refused: Out of Resources. The spool is below `storage.min_free_mb` or the disk is
# full; a sender may retry later.
STATUS_OUT_OF_SPACE = 0xA700
# Refused: Out of Resources. The spool could not write the file (an I/O error).
STATUS_SPOOL_FAILED = 0xA701
# Refused: Out of Resources. The database could not record the instance (locked for
# longer than the busy timeout, or unreachable); the stored file was removed.
STATUS_DATABASE_UNAVAILABLE = 0xA702
# Error: Data Set does not match SOP Class. A required UID is missing, empty, longer
# than 64 characters, or differs from the one in the C-STORE request.
STATUS_DATASET_MISMATCH = 0xA900
# Error: Cannot understand. The data set cannot be parsed as DICOM.
STATUS_CANNOT_UNDERSTAND = 0xC000
# Processing failure (general status): an unexpected error; nothing was recorded.
STATUS_PROCESSING_FAILURE = 0x0110

# Uncompressed and the common compressed transfer syntaxes, stored as received.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# How often an association's DUL thread polls while idle (pynetdicom: 1 ms). Lower
# answers sooner and costs CPU only while an association is open.
DUL_POLL_INTERVAL_S = 0.0002

# PDUs (PS3.8 9.3): a 6-byte header (type, reserved, 4-byte length), then the body.
PDU_HEADER_LENGTH = 6
P_DATA_TF_TYPE = 0x04
# Association, release and abort PDUs carry names and negotiation items: a few KiB,
# even with every storage SOP class proposed. A longer one is not a DICOM peer.
MAX_CONTROL_PDU_LENGTH = 1024 * 1024

# DICOM UI values are at most 64 characters (PS3.5 6.2).
UID_MAX_LENGTH = 64
# Column widths of the optional header fields recorded (db.models): longer values are
# cut rather than refused, since they only label the study.
_TEXT_LIMITS = {
    "Modality": 16,
    "BodyPartExamined": 16,
    "PatientID": 64,
    "PatientName": 324,
    "AccessionNumber": 16,
    "StudyDate": 16,
}
# The header values needed all come before (0020,000E) Series Instance UID, where
# parsing stops: nothing after it (pixel data included) is read.
_LAST_HEADER_TAG = 0x0020000E
# A deflated data set is inflated only this far to find its header.
_INFLATE_LIMIT = 16 * 1024 * 1024
_PREAMBLE = b"\x00" * 128 + b"DICM"


def database_problem(error: SQLAlchemyError) -> str:
    """What went wrong, without the statement and its parameters (patient data)."""
    original = getattr(error, "orig", None)
    return f"{type(error).__name__}: {original}" if original is not None else type(error).__name__


# --- header ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceHeader:
    """The few header values the `instances` and `studies` rows need."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str | None
    modality: str | None
    body_part: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None


class HeaderError(Exception):
    """A data set the receiver refuses; `status` is the C-STORE status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def read_header(dataset: bytes | BytesIO, transfer_syntax: str) -> InstanceHeader:
    """Parse only the header values the rows need from an encoded data set (no file meta).

    Reads elements up to Series Instance UID and stops: pixel data is never read or
    decoded, and a stream is read in place, not copied. Raises `HeaderError` with
    `STATUS_CANNOT_UNDERSTAND` for bytes that are not a DICOM data set,
    `STATUS_DATASET_MISMATCH` for a missing or malformed SOP Class, SOP Instance or
    Study Instance UID.
    """
    stream = BytesIO(dataset) if isinstance(dataset, bytes) else dataset
    stream.seek(0)
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            stream = BytesIO(inflater.decompress(stream.getbuffer(), _INFLATE_LIMIT))
        parsed = read_dataset(
            stream,
            is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax != ExplicitVRBigEndian,
            stop_when=_past_header,
        )
        sop_class_uid = _uid(parsed, "SOPClassUID")
        sop_instance_uid = _uid(parsed, "SOPInstanceUID")
        study_uid = _uid(parsed, "StudyInstanceUID")
        series_uid = _optional_uid(parsed, "SeriesInstanceUID")
    except HeaderError:
        raise
    except Exception as error:
        raise HeaderError(
            STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(error).__name__})"
        ) from error
    return InstanceHeader(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=_text(parsed, "Modality"),
        body_part=_text(parsed, "BodyPartExamined"),
        patient_id=_text(parsed, "PatientID"),
        patient_name=_text(parsed, "PatientName"),
        accession_number=_text(parsed, "AccessionNumber"),
        study_date=_text(parsed, "StudyDate"),
    )


def _past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_HEADER_TAG


def _uid(dataset: Dataset, keyword: str) -> str:
    value = _optional_uid(dataset, keyword)
    if value is None:
        raise HeaderError(STATUS_DATASET_MISMATCH, f"{keyword} is missing or empty")
    return value


def _optional_uid(dataset: Dataset, keyword: str) -> str | None:
    element = dataset.get(keyword)
    if element is None or element == "":
        return None
    value = str(element).strip("\0 ")
    if not value:
        return None
    if len(value) > UID_MAX_LENGTH:
        raise HeaderError(
            STATUS_DATASET_MISMATCH,
            f"{keyword} has {len(value)} characters; expected at most {UID_MAX_LENGTH}",
        )
    if not all(" " <= character <= "~" and character != "\\" for character in value):
        raise HeaderError(
            STATUS_DATASET_MISMATCH,
            f"{keyword} contains characters a UID cannot have; expected digits and dots",
        )
    return value


def _text(dataset: Dataset, keyword: str) -> str | None:
    # Only labels: a value that cannot be decoded (odd character set) is left out
    # rather than refusing the image.
    try:
        value = dataset.get(keyword)
        text = "" if value is None else str(value).strip()
    except Exception:
        log.debug("%s could not be decoded; not recorded", keyword, exc_info=True)
        return None
    return text[: _TEXT_LIMITS[keyword]] or None


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    # Group 0002 is always explicit VR little endian; OB has a 4-byte length.
    tag = struct.pack("<HH", 0x0002, element)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _even(text: str, padding: bytes) -> bytes:
    data = text.encode("ascii", "replace")
    return data + padding if len(data) % 2 else data


def file_preamble(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """Preamble, ``DICM`` and File Meta Information that make a received data set a
    DICOM file (PS3.10 7.1), written directly: pydicom's writer costs more than the
    rest of the header work per C-STORE."""
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax_uid, b"\0")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ]
    if source_ae_title:
        elements.append(_meta_element(0x0016, b"AE", _even(source_ae_title, b" ")))
    body = b"".join(elements)
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


# --- shared state of the handlers ------------------------------------------------------


@dataclass
class AssociationRecord:
    """What the receiver tracks for one open association."""

    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int | None
    association_id: int | None = None
    # The peer sent an A-RELEASE-RQ: its delivery ended normally, however the
    # connection then closes.
    release_requested: bool = False
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class ReceiverStats:
    """Counts since start, for logs and tests."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    associations: int = 0
    rejected_associations: int = 0


class ReceiverContext:
    """Everything the handlers need: the spool, the database and the receive settings."""

    def __init__(
        self,
        *,
        spool: Spool,
        sessions: sessionmaker[Session],
        min_free_mb: int,
        max_pdu: int = 0,
        clock: Callable[[], float] = time.monotonic,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.min_free_mb = min_free_mb
        # `ae.max_pdu`: a P-DATA-TF PDU announcing more is dropped unread (0: no limit).
        self.max_pdu = max_pdu
        self.clock = clock
        self.metrics = metrics
        self.stats = ReceiverStats()
        self._lock = threading.Lock()
        self._open: dict[Association, AssociationRecord] = {}

    def track(self, assoc: Association) -> AssociationRecord:
        """The record of `assoc`, created on first use."""
        with self._lock:
            record = self._open.get(assoc)
            if record is None:
                requestor = assoc.requestor
                primitive = requestor.primitive
                called = getattr(primitive, "called_ae_title", None) or assoc.acceptor.ae_title
                record = AssociationRecord(
                    calling_aet=str(requestor.ae_title).strip(),
                    called_aet=str(called).strip(),
                    peer_host=str(requestor.address),
                    peer_port=int(requestor.port) if requestor.port else None,
                )
                self._open[assoc] = record
            return record

    def is_open(self, assoc: Association) -> bool:
        with self._lock:
            return assoc in self._open

    def forget(self, assoc: Association) -> AssociationRecord | None:
        with self._lock:
            return self._open.pop(assoc, None)

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + amount)

    @property
    def open_associations(self) -> int:
        with self._lock:
            return len(self._open)


# --- association events ----------------------------------------------------------------


def on_connection_open(event: evt.Event, context: ReceiverContext) -> None:
    """Tune the accepted connection for request/response latency.

    Nagle's algorithm off: a C-STORE response must leave at once, not wait for the
    peer's delayed ACK (pynetdicom leaves accepted sockets as they are). And the
    DUL thread of this association polls its socket and queues every
    `DUL_POLL_INTERVAL_S` instead of pynetdicom's 1 ms: each C-STORE waits for that
    poll twice (request in, response out). pynetdicom has no public setting for it;
    on a version without the attribute this assignment does nothing.

    And the network timeout on the socket itself: an accepted socket is blocking
    without one (Python does not pass the listening socket's timeout on), so a peer
    that stops half way through a PDU would hold its thread and its place among
    `ae.max_associations` for as long as it keeps the connection open. Last, PDU
    lengths are checked before a body is read (`_PduLengthGuard`).
    """
    event.assoc.dul._run_loop_delay = DUL_POLL_INTERVAL_S
    transport = event.assoc.dul.socket
    if transport is None:
        return
    # pynetdicom reads every PDU through this method; no public hook sees the header.
    transport.recv = _PduLengthGuard(transport.recv, context.max_pdu)  # type: ignore[method-assign]
    raw = getattr(transport, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as error:
            log.debug("TCP_NODELAY not set: %s", error)
        raw.settimeout(event.assoc.network_timeout)


class _PduLengthGuard:
    """Wraps a connection's `recv` so that a PDU announcing more than radgate accepts
    ends the connection before its body is read.

    pynetdicom reads a PDU's 6-byte header, then its whole body into memory, however
    long the header says it is: a peer announcing 4 GiB and streaming would be
    buffered. An OSError here is what pynetdicom treats as a closed connection.
    """

    def __init__(self, recv: Callable[[int], bytearray], max_pdu: int) -> None:
        self._recv = recv
        self._max_pdu = max_pdu
        # Reads alternate: a header, then the body it announced (a 6-byte body is
        # not a header).
        self._body_next = False

    def __call__(self, nr_bytes: int) -> bytearray:
        data = self._recv(nr_bytes)
        is_header = not self._body_next and nr_bytes == PDU_HEADER_LENGTH
        self._body_next = is_header and len(data) == PDU_HEADER_LENGTH
        if self._body_next:
            pdu_type, _, length = struct.unpack(">BBL", data)
            limit = self._max_pdu if pdu_type == P_DATA_TF_TYPE else MAX_CONTROL_PDU_LENGTH
            if limit and length > limit:
                log.warning(
                    "connection dropped: PDU type 0x%02X announces %d bytes; at most %d accepted",
                    pdu_type,
                    length,
                    limit,
                )
                raise OSError(f"PDU of {length} bytes exceeds the limit of {limit}")
        return data


def on_accepted(event: evt.Event, context: ReceiverContext) -> None:
    """Record the association; its id links the instances it delivers."""
    record = context.track(event.assoc)
    context.count(associations=1)
    record.association_id = _open_association_row(context, record)
    log.debug(
        "association accepted from %s (%s:%s)",
        record.calling_aet,
        record.peer_host,
        record.peer_port,
    )


def _open_association_row(context: ReceiverContext, record: AssociationRecord) -> int | None:
    try:
        with context.sessions() as session:
            return open_association(
                session,
                calling_aet=record.calling_aet,
                called_aet=record.called_aet,
                peer_host=record.peer_host,
                peer_port=record.peer_port,
            )
    except SQLAlchemyError as error:
        # The first C-STORE tries again and is refused if the database is still down.
        log.error(
            "association from %s not recorded yet: %s", record.calling_aet, database_problem(error)
        )
        return None


def on_rejected(event: evt.Event, context: ReceiverContext) -> None:
    """Log and record a refused association as a security event."""
    record = context.track(event.assoc)
    context.forget(event.assoc)
    context.count(rejected_associations=1)
    primitive = event.assoc.acceptor.primitive
    reason = refusal_reason(event.assoc) or getattr(primitive, "reason_str", None) or "rejected"
    log.warning(
        "association from calling AE %r at %s:%s rejected: %s",
        record.calling_aet,
        record.peer_host,
        record.peer_port,
        reason,
    )
    try:
        with context.sessions() as session:
            record_rejected_association(
                session,
                calling_aet=record.calling_aet,
                called_aet=record.called_aet,
                peer_host=record.peer_host,
                peer_port=record.peer_port,
                reason=reason,
            )
    except SQLAlchemyError as error:
        log.error(
            "rejected association from %r not recorded: %s",
            record.calling_aet,
            database_problem(error),
        )


def on_released(event: evt.Event, context: ReceiverContext) -> None:
    _close(event.assoc, context, AssociationOutcome.RELEASED, None)


def on_aborted(event: evt.Event, context: ReceiverContext) -> None:
    _close(event.assoc, context, AssociationOutcome.ABORTED, "aborted")


def on_pdu_received(event: evt.Event, context: ReceiverContext) -> None:
    """Note an A-RELEASE-RQ as it arrives (in the DUL thread, before the connection can
    close): pynetdicom reports the release in the association thread, and the peer
    may close the connection, reported in the DUL thread, before that runs."""
    if isinstance(event.pdu, A_RELEASE_RQ):
        context.track(event.assoc).release_requested = True


def on_connection_close(event: evt.Event, context: ReceiverContext) -> None:
    # Still open here: the peer released and closed before EVT_RELEASED ran, or it
    # vanished without a release (or a timeout dropped it), which counts as an abort.
    record = context.track(event.assoc) if context.is_open(event.assoc) else None
    if record is not None and record.release_requested:
        _close(event.assoc, context, AssociationOutcome.RELEASED, None)
    else:
        _close(
            event.assoc, context, AssociationOutcome.ABORTED, "connection closed without release"
        )


def _close(
    assoc: Association,
    context: ReceiverContext,
    outcome: AssociationOutcome,
    reason: str | None,
) -> None:
    record = context.forget(assoc)
    if record is None:
        return
    seconds = context.clock() - record.started
    log.info(
        "association from %s (%s) %s after %.1f s: %d stored, %d duplicate(s), %d refused",
        record.calling_aet,
        record.peer_host,
        outcome.value if reason is None else reason,
        seconds,
        record.stored,
        record.duplicates,
        record.refused,
    )
    if record.association_id is None:
        return
    try:
        with context.sessions() as session:
            close_association(session, record.association_id, outcome, reason)
    except SQLAlchemyError as error:
        # Left open in the database: the next start closes it as aborted, so its
        # studies still become ready (after `study.unreleased_timeout_s`).
        log.error(
            "association %d not closed in the database: %s",
            record.association_id,
            database_problem(error),
        )
    except LookupError as error:
        # The row is gone (deleted by hand or by retention): nothing left to close.
        log.error("association %d not closed: %s", record.association_id, error)


# --- C-STORE ---------------------------------------------------------------------------


def on_store(event: evt.Event, context: ReceiverContext) -> int:
    """Store one instance durably and record it; returns the C-STORE status."""
    record = context.track(event.assoc)
    started = time.perf_counter()
    duplicates = record.duplicates
    status = _store(event, context, record)
    if status == STATUS_SUCCESS:
        record.stored += 1
        if context.metrics is not None:
            context.metrics.stored(
                record.calling_aet,
                time.perf_counter() - started,
                duplicate=record.duplicates > duplicates,
            )
    else:
        record.refused += 1
        context.count(refused=1)
        if context.metrics is not None:
            context.metrics.refused(status)
    return status


def _store(event: evt.Event, context: ReceiverContext, record: AssociationRecord) -> int:
    request = cast(C_STORE, event.request)
    transfer_syntax = str(event.context.transfer_syntax)
    # The data set as received, read in place: a radiograph is megabytes, and copying
    # it (as `event.encoded_dataset()` does, twice) costs more than parsing its header.
    received = request.DataSet
    dataset: bytes | BytesIO = (
        received if isinstance(received, BytesIO) else event.encoded_dataset(include_meta=False)
    )
    try:
        header = read_header(dataset, transfer_syntax)
        _check_request(header, request)
    except HeaderError as error:
        log.warning(
            "C-STORE from %s refused (0x%04X): %s",
            record.calling_aet,
            error.status,
            error.reason,
        )
        return error.status

    if record.association_id is None:
        # Not recorded when it was accepted (database unavailable then): try again.
        record.association_id = _open_association_row(context, record)
        if record.association_id is None:
            log.error("C-STORE from %s refused: the database is unavailable", record.calling_aet)
            return STATUS_DATABASE_UNAVAILABLE

    preamble = file_preamble(
        header.sop_class_uid, header.sop_instance_uid, transfer_syntax, record.calling_aet
    )
    body = dataset.getbuffer() if isinstance(dataset, BytesIO) else memoryview(dataset)
    try:
        return _store_file(context, record, header, transfer_syntax, [preamble, body])
    finally:
        body.release()


def _store_file(
    context: ReceiverContext,
    record: AssociationRecord,
    header: InstanceHeader,
    transfer_syntax: str,
    parts: list[bytes | memoryview],
) -> int:
    size = sum(len(part) for part in parts)
    if not context.spool.has_room(context.min_free_mb, size):
        log.warning(
            "C-STORE from %s refused: spool below the free-space watermark of %d MB",
            record.calling_aet,
            context.min_free_mb,
        )
        return STATUS_OUT_OF_SPACE
    try:
        stored = context.spool.store(parts, key=header.sop_instance_uid)
    except SpoolFull as error:
        log.warning("C-STORE from %s refused: %s", record.calling_aet, error)
        return STATUS_OUT_OF_SPACE
    except SpoolError as error:
        log.error("C-STORE from %s refused: %s", record.calling_aet, error)
        return STATUS_SPOOL_FAILED

    try:
        received = ReceivedInstance(
            study_uid=header.study_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=transfer_syntax,
            spool_path=stored.path,
            sha256=stored.sha256,
            size_bytes=stored.size,
            series_uid=header.series_uid,
            modality=header.modality,
            body_part=header.body_part,
            calling_aet=record.calling_aet,
            association_id=record.association_id,
            patient_id=header.patient_id,
            patient_name=header.patient_name,
            accession_number=header.accession_number,
            study_date=header.study_date,
        )
        with context.sessions() as session:
            result = record_instance(session, received)
    except SQLAlchemyError as error:
        _remove_quietly(context.spool, stored.path)
        log.error(
            "C-STORE from %s refused: the database did not record it (%s)",
            record.calling_aet,
            database_problem(error),
        )
        return STATUS_DATABASE_UNAVAILABLE
    except Exception:
        _remove_quietly(context.spool, stored.path)
        log.exception("C-STORE from %s failed unexpectedly", record.calling_aet)
        return STATUS_PROCESSING_FAILURE

    if result.duplicate:
        _remove_quietly(context.spool, stored.path)
        record.duplicates += 1
        context.count(duplicates=1)
        if result.same_content:
            log.debug("duplicate %s acknowledged; first copy kept", header.sop_instance_uid)
        else:
            log.warning(
                "duplicate SOP Instance UID %s from %s differs from the first copy;"
                " the first copy is kept",
                header.sop_instance_uid,
                record.calling_aet,
            )
    else:
        context.count(stored=1)
    return STATUS_SUCCESS


def _check_request(header: InstanceHeader, request: Any) -> None:
    """The data set must be the instance the C-STORE request names."""
    for keyword, expected, actual in (
        ("SOPClassUID", request.AffectedSOPClassUID, header.sop_class_uid),
        ("SOPInstanceUID", request.AffectedSOPInstanceUID, header.sop_instance_uid),
    ):
        if expected is not None and str(expected).strip("\0 ") != actual:
            raise HeaderError(
                STATUS_DATASET_MISMATCH,
                f"{keyword} {actual} in the data set differs from {expected} in the request",
            )


def _remove_quietly(spool: Spool, relative: str) -> None:
    try:
        spool.remove(relative)
    except SpoolError as error:
        log.warning("%s", error)


# --- the AE ----------------------------------------------------------------------------


def build_ae(config: AEConfig) -> AE:
    """An AE answering C-ECHO and every storage SOP class, configured from `ae`."""
    ae = AE(ae_title=config.title)
    ae.maximum_associations = config.max_associations
    # pynetdicom: 0 means no limit, as in the configuration.
    ae.maximum_pdu_size = config.max_pdu
    ae.network_timeout = config.network_timeout_s
    ae.acse_timeout = config.acse_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    # The titles of ae.allowed_peers too: gateway.security checks their addresses.
    ae.require_calling_aet = config.allowed_callers()
    ae.require_called_aet = config.require_called_aet
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in StoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


_PYNETDICOM_LOG_EVENTS = (
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
)


def event_handlers(context: ReceiverContext) -> list[Any]:
    """The receiver's handlers, each given `context`."""
    arguments = [context]
    return [
        (evt.EVT_CONN_OPEN, on_connection_open, arguments),
        (evt.EVT_ACCEPTED, on_accepted, arguments),
        (evt.EVT_REJECTED, on_rejected, arguments),
        (evt.EVT_C_STORE, on_store, arguments),
        (evt.EVT_PDU_RECV, on_pdu_received, arguments),
        (evt.EVT_RELEASED, on_released, arguments),
        (evt.EVT_ABORTED, on_aborted, arguments),
        (evt.EVT_CONN_CLOSE, on_connection_close, arguments),
    ]


def start_server(
    ae: AE,
    host: str,
    port: int,
    context: ReceiverContext,
    *,
    tls_context: ssl.SSLContext | None = None,
    peer_policy: PeerPolicy | None = None,
) -> ThreadedAssociationServer:
    """Listen on (host, port) in background threads; port 0 picks a free one.

    With `tls_context`, only DICOM over TLS; `peer_policy` rejects callers from
    addresses their AE title is not allowed from (see gateway.security).
    """

    def on_tls_failure(peer_host: str, peer_port: int | None, reason: str) -> None:
        context.count(rejected_associations=1)
        record_security_alert(
            context.sessions,
            "connection refused",
            peer_host=peer_host,
            peer_port=peer_port,
            reason=reason,
        )

    server = start_gateway_server(
        ae,
        (host, port),
        event_handlers(context),
        peer_policy=peer_policy or PeerPolicy({}),
        tls_context=tls_context,
        on_tls_failure=on_tls_failure,
    )
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        # pynetdicom's standard handlers describe every PDU and DIMSE message for its
        # debug log, and copy each received data set to see whether it is empty: work
        # per C-STORE for log lines nobody reads at INFO.
        for event in _PYNETDICOM_LOG_EVENTS:
            bound = cast(list[tuple[Callable[..., Any], Any]], server.get_handlers(event))
            for handler, _ in list(bound):
                if getattr(handler, "__module__", "").startswith("pynetdicom."):
                    server.unbind(event, handler)
    return server
