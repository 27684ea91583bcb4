"""Packing integer codes at exactly N bits each: ONNX's INT4/INT2 layout generalised to every N.

The packed form of a code tensor is one little-endian *bit stream*: the tensor is flattened in
C order, and bit j (0 = least significant) of element i is stream bit i·N + j, which lives in bit
(i·N + j) mod 8 of byte ⌊(i·N + j)/8⌋. For N = 4 and N = 2 this is exactly how ONNX packs INT4
and INT2 tensors (element i at bit (i·N) mod 8 of byte ⌊i·N/8⌋, low bits first); for N that does
not divide 8 an element may straddle two bytes. The tail of the last byte is zero. A tensor of
`count` codes takes ``ceil(count·N/8)`` bytes, nothing more.

Two encodings of an N-bit field:
- ``twos_complement``: the field is the code in N-bit two's complement (-2^(N-1) ... 2^(N-1)-1).
- ``sign`` (N = 1 only, codes ±1): Larq's convention, bit 1 ⇔ code −1, bit 0 ⇔ code +1.

docs/packing.md describes the layout for readers in other languages. Everything here is
vectorised numpy (one bit per byte in an intermediate array: 8·count bytes of scratch at most).
"""
from __future__ import annotations

import numpy as np

TWOS_COMPLEMENT = "twos_complement"
SIGN = "sign"
ENCODINGS = (TWOS_COMPLEMENT, SIGN)
MAX_WIDTH = 16  # widths 1..16 pack; qexport uses 1..9 (the thesis scheme at 8 bits is stored in 9)


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` codes at `bits` bits each: ceil(count·bits/8)."""
    return -(-count * bits // 8)


def code_range(bits: int, encoding: str = TWOS_COMPLEMENT) -> tuple[int, int]:
    """Smallest and largest code an N-bit field holds in this encoding."""
    _check(bits, encoding)
    if encoding == SIGN:
        return -1, 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check(bits: int, encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_WIDTH:
        raise ValueError(f"bits per code must be an integer from 1 to {MAX_WIDTH}, got {bits!r}")
    if encoding == SIGN and bits != 1:
        raise ValueError(f"the sign encoding has 1 bit per code, got {bits}")


def pack(codes: np.ndarray, bits: int, encoding: str = TWOS_COMPLEMENT) -> np.ndarray:
    """Pack integer `codes` (any shape, read in C order) at `bits` bits each; returns uint8 of
    ``packed_size(codes.size, bits)`` bytes. Raises ValueError for a code the field cannot hold."""
    _check(bits, encoding)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {flat.dtype}")
    v = flat.astype(np.int64)
    lo, hi = code_range(bits, encoding)
    if encoding == SIGN:
        if v.size and not np.all((v == 1) | (v == -1)):
            bad = v[(v != 1) & (v != -1)][0]
            raise ValueError(f"the sign encoding holds codes -1 and +1 only, found {bad}")
        field = (v < 0).astype(np.uint16)  # Larq: bit 1 <=> -1
    else:
        if v.size and (v.min() < lo or v.max() > hi):
            bad = v[(v < lo) | (v > hi)][0]
            raise ValueError(f"code {bad} does not fit {bits}-bit two's complement ({lo}..{hi})")
        field = (v & ((1 << bits) - 1)).astype(np.uint16)  # two's complement: keep the low N bits
    # bit j of element i -> stream position i·N + j (C-order flattening of the (count, N) array)
    stream = ((field[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")  # pads the tail of the last byte with zeros


def unpack(data: bytes | np.ndarray, count: int, bits: int, encoding: str = TWOS_COMPLEMENT,
           dtype: np.dtype | type = np.int16) -> np.ndarray:
    """The `count` codes packed in `data` (1-D, C order), as `dtype`. Raises ValueError when the
    byte count is not exactly ``packed_size(count, bits)`` or the padding bits are not zero."""
    _check(bits, encoding)
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"packed data must be a 1-D uint8 array, got {buf.dtype} with shape {buf.shape}")
    need = packed_size(count, bits)
    if buf.size != need:
        raise ValueError(f"{count} codes at {bits} bits take {need} bytes, got {buf.size}")
    stream = np.unpackbits(buf, bitorder="little")
    if stream[count * bits:].any():
        raise ValueError("the padding bits after the last code are not zero: the data is corrupted")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int32)
    field = (fields << np.arange(bits, dtype=np.int32)).sum(axis=1, dtype=np.int32)
    if encoding == SIGN:
        out = 1 - 2 * field
    else:
        out = np.where(field >= 1 << (bits - 1), field - (1 << bits), field)  # sign-extend
    return out.astype(dtype)
