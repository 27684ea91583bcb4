"""Packing codes at N bits: exact round trips, exact sizes, and byte-identical to ONNX INT4/INT2."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qadmm.codes import CodeSet
from qexport.pack import bitpack
from qexport.pack.packfile import encoding_for

CODE_SETS = [CodeSet(1, "binary")] + [CodeSet(b, "symmetric") for b in range(2, 9)] + [CodeSet(b, "thesis") for b in range(1, 9)]


@st.composite
def shaped_codes(draw, codes: CodeSet):
    """Codes of a random shape (up to 4 dims, any size incl. 0 and sizes not divisible by 8/N)."""
    shape = tuple(draw(st.lists(st.integers(0, 13), min_size=1, max_size=4)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    levels = np.array(codes.levels)
    return rng.choice(levels, size=shape).astype(np.int16)


@settings(max_examples=25, deadline=None)
@pytest.mark.parametrize("codes", CODE_SETS, ids=lambda c: f"{c.scheme}{c.bits}")
@given(data=st.data())
def test_pack_unpack_identical_and_size_exact(codes, data):
    q = data.draw(shaped_codes(codes))
    width, enc = codes.storage_bits, encoding_for(codes)
    packed = bitpack.pack(q, width, enc)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == -(-q.size * width // 8) == bitpack.packed_size(q.size, width)
    back = bitpack.unpack(packed, q.size, width, enc).reshape(q.shape)
    assert np.array_equal(back, q)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 16), n=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_every_width_round_trips_full_range(width, n, seed):
    lo, hi = bitpack.code_range(width)
    q = np.random.default_rng(seed).integers(lo, hi + 1, size=n)
    assert np.array_equal(bitpack.unpack(bitpack.pack(q, width), n, width, dtype=np.int64), q)


def test_worked_example_from_docs():
    # docs/packing.md §2: a 2x3 symmetric 3-bit layer; fields 001 111 011 101 010 000 (MSB first),
    # stream LSB first -> F9 2A 00
    assert bitpack.pack(np.array([[1, -1, 3], [-3, 2, 0]]), 3).tolist() == [0xF9, 0x2A, 0x00]
    assert bitpack.unpack(bytes([0xF9, 0x2A, 0x00]), 6, 3).tolist() == [1, -1, 3, -3, 2, 0]
    # 1-bit binary, Larq sign bit (1 <=> -1)
    assert bitpack.pack(np.array([[1, -1, -1], [1, 1, 1]]), 1, bitpack.SIGN).tolist() == [0x06]
    assert bitpack.pack(np.array([1, -1, -1, 1, 1, 1, 1, -1, -1]), 1, bitpack.SIGN).tolist() == [0x86, 0x01]
    # 4 bits: low nibble first, as ONNX INT4
    assert bitpack.pack(np.array([[-5, 3], [0, 7], [-7, 1]]), 4).tolist() == [0x3B, 0x70, 0x19]
    # C order: a (2, 3) tensor packs row by row, whatever its memory layout
    q = np.array([[1, -2, 0], [-1, 1, -2]])
    assert np.array_equal(bitpack.pack(np.asfortranarray(q), 2), bitpack.pack(q.reshape(-1), 2))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 41), seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([2, 4]))
def test_bytes_equal_onnx_int2_int4_raw_data(n, seed, bits):
    lo, hi = bitpack.code_range(bits)
    q = np.random.default_rng(seed).integers(lo, hi + 1, size=n)
    ours = bitpack.pack(q, bits).tobytes()
    dtype, proto = (ml_dtypes.int4, TensorProto.INT4) if bits == 4 else (ml_dtypes.int2, TensorProto.INT2)
    t = numpy_helper.from_array(q.astype(dtype), "w")
    assert t.data_type == proto and t.raw_data == ours
    # make_tensor (raw=False) stores the same packed bytes, one per int32
    assert bytes(helper.make_tensor("w", proto, [n], q.tolist()).int32_data) == ours


def test_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit 4-bit"):
        bitpack.pack(np.array([0, 8]), 4)
    with pytest.raises(ValueError, match="-1 and \\+1 only"):
        bitpack.pack(np.array([1, 0]), 1, bitpack.SIGN)
    with pytest.raises(ValueError, match="integers"):
        bitpack.pack(np.array([0.5]), 4)
    for bits in (0, 17):
        with pytest.raises(ValueError, match="from 1 to 16"):
            bitpack.pack(np.array([0]), bits)
    with pytest.raises(ValueError, match="1 bit per code"):
        bitpack.pack(np.array([1]), 2, bitpack.SIGN)


def test_unpack_checks_length_and_padding():
    data = bitpack.pack(np.array([1, -1, 1]), 3)  # 9 bits -> 2 bytes
    with pytest.raises(ValueError, match="take 2 bytes, got 3"):
        bitpack.unpack(np.append(data, 0).astype(np.uint8), 3, 3)
    with pytest.raises(ValueError, match="take 2 bytes, got 1"):
        bitpack.unpack(data[:1], 3, 3)
    bad = data.copy()
    bad[-1] |= 0x80
    with pytest.raises(ValueError, match="padding bits"):
        bitpack.unpack(bad, 3, 3)
