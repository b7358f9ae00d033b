"""Errors radgate reports to people and records in the database.

`RadgateError` is a user-facing failure: the CLI prints its message as one line.
`InvalidInput` is an image that is not valid model input; its `reason` is short,
stable text the gate records (e.g. ``multi-frame``, ``no pixel data``).
"""

from __future__ import annotations


class RadgateError(Exception):
    """A failure that names the problem for the user; no traceback needed."""


class InvalidInput(RadgateError):
    """An image that cannot be model input. `reason` is what the gate records."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class NoPixelData(InvalidInput):
    def __init__(self, detail: str = "") -> None:
        super().__init__("no pixel data", detail)


class MultiFrame(InvalidInput):
    def __init__(self, frames: int) -> None:
        super().__init__("multi-frame", f"{frames} frames")


class DecoderMissing(InvalidInput):
    def __init__(self, transfer_syntax: str, detail: str = "") -> None:
        super().__init__(f"no decoder for transfer syntax {transfer_syntax}", detail)


class UndecodablePixels(InvalidInput):
    def __init__(self, detail: str) -> None:
        super().__init__("pixel data does not decode", detail)


class ImageTooSmall(InvalidInput):
    def __init__(self, rows: int, columns: int, minimum: int) -> None:
        super().__init__(f"image {columns}x{rows} smaller than {minimum}x{minimum}")


class UnsupportedPhotometric(InvalidInput):
    def __init__(self, photometric: str) -> None:
        super().__init__(f"photometric interpretation {photometric} not monochrome or RGB")


class MissingPixelAttribute(InvalidInput):
    def __init__(self, keyword: str) -> None:
        super().__init__(f"{keyword} missing", "required to decode the pixel data")


class ImageTooLarge(InvalidInput):
    def __init__(self, rows: int, columns: int, max_side: int, max_pixels: int) -> None:
        super().__init__(
            f"image {columns}x{rows} too large",
            f"at most {max_side} pixels a side and {max_pixels} pixels in all",
        )


class UnsupportedBitsAllocated(InvalidInput):
    def __init__(self, bits_allocated: int, supported: tuple[int, ...]) -> None:
        expected = " or ".join(str(bits) for bits in supported)
        super().__init__(f"BitsAllocated {bits_allocated} not supported", f"expected {expected}")


class TruncatedPixelData(InvalidInput):
    def __init__(self, actual_bytes: int, expected_bytes: int) -> None:
        super().__init__("pixel data truncated", f"{actual_bytes} bytes, expected {expected_bytes}")
