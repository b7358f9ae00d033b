"""The receiver's PDU length check, fed scripted reads (the socket side is in
tests/integration/test_hostile_input.py)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from gateway.scp import MAX_CONTROL_PDU_LENGTH, _PduLengthGuard

A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04


def header(pdu_type: int, length: int) -> bytearray:
    return bytearray(struct.pack(">BBL", pdu_type, 0, length))


def scripted(*reads: bytearray) -> Callable[[int], bytearray]:
    queue = list(reads)

    def recv(nr_bytes: int) -> bytearray:
        data = queue.pop(0)
        assert len(data) <= nr_bytes
        return data

    return recv


def test_pdus_within_the_limits_pass_unchanged() -> None:
    body = bytearray(b"\x00" * 100)
    guard = _PduLengthGuard(scripted(header(P_DATA_TF, 100), body), max_pdu=16384)
    assert guard(6) == header(P_DATA_TF, 100)
    assert guard(100) is body


@pytest.mark.parametrize(
    ("pdu_type", "length", "max_pdu"),
    [
        (A_ASSOCIATE_RQ, MAX_CONTROL_PDU_LENGTH + 1, 0),
        (A_ASSOCIATE_RQ, 0xFFFFFFFF, 1 << 40),
        (P_DATA_TF, 16385, 16384),
    ],
)
def test_a_longer_announcement_ends_the_connection_before_the_body(
    pdu_type: int, length: int, max_pdu: int
) -> None:
    reads = []

    def recv(nr_bytes: int) -> bytearray:
        reads.append(nr_bytes)
        return header(pdu_type, length)

    guard = _PduLengthGuard(recv, max_pdu=max_pdu)
    with pytest.raises(OSError, match=f"PDU of {length} bytes exceeds the limit"):
        guard(6)
    assert reads == [6]  # the body was never asked for


def test_data_pdus_are_unlimited_when_max_pdu_is_0() -> None:
    guard = _PduLengthGuard(scripted(header(P_DATA_TF, 1 << 30)), max_pdu=0)
    assert guard(6) == header(P_DATA_TF, 1 << 30)


def test_a_six_byte_body_is_not_read_as_a_header() -> None:
    # A 6-byte P-DATA body whose bytes, read as a header, would announce 0x02FFFFFF.
    body = bytearray(b"\x02\x00\x02\xff\xff\xff")
    guard = _PduLengthGuard(scripted(header(P_DATA_TF, 6), body), max_pdu=16)
    guard(6)
    assert guard(6) is body
