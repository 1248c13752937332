"""The block codec (duckling/recording/codec.py): exact round trips for every layout it writes and reads, and
any subset of records (the first format-2 layouts, no segments and 64-row groups, are decoded by compact's
upgrade of the golden recordings: tests/test_recording_v2.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from duckling.recording import codec
from duckling.errors import DucklingError
from duckling.recording.reader import Recording

from test_recording_v2 import B, N_LIVE, V, _flip, write

WIDTHS = [16, 16, 16, 8, 4, 4, 4, 1, 1]  # uneven groups, like W's 16-row live and 1-row dead groups


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("segment", [None, 1, 2, 3, 32])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 64])
def test_round_trip_is_exact_for_any_records(n, segment, dtype):
    rng = np.random.default_rng(n)
    top = np.iinfo(dtype).max
    walk = rng.integers(-3, 4, (n, sum(WIDTHS))).cumsum(0)  # small steps (like training) ...
    x = (rng.integers(0, top, sum(WIDTHS), dtype=np.uint64) + walk).astype(dtype)  # ... wrapping around
    x[:, -1] = rng.integers(0, top, n, dtype=np.uint64).astype(dtype)  # and one column of noise
    blob = codec.encode_block(x, range(10, 10 + n), WIDTHS, segment=segment)
    h, offsets = codec.read_header(blob, len(blob))
    assert h["steps"] == list(range(10, 10 + n)) and h.get("segment") == segment
    got = codec.decode_groups(blob, h, offsets, range(len(WIDTHS)))
    assert np.array_equal(np.concatenate([got[g] for g in range(len(WIDTHS))], axis=1), x)
    bounds = np.cumsum([0, *WIDTHS])
    for records in ([0], [n - 1], [n // 2], list(range(0, n, 2)), list(range(n // 2, n))):
        got = codec.decode_groups(blob, h, offsets, [1, 7, 8], records)
        for g in (1, 7, 8):
            assert np.array_equal(got[g], x[records, bounds[g]:bounds[g + 1]]), (records, g)


def test_segments_cut_a_snapshot_read_to_the_anchor_and_one_range():
    x = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32)
    blob = codec.encode_block(x, range(64), [16, 16], segment=32)
    h, offsets = codec.read_header(blob, len(blob))
    assert h["ranges"] == [(0, 1), (1, 32), (32, 64)] and all(len(o) == 4 for o in offsets)
    one = codec.decode_groups(blob, h, offsets, [0, 1], [40])
    assert np.array_equal(np.concatenate([one[0], one[1]], axis=1), x[[40]])
    blob = bytearray(blob)
    blob[offsets[0][1] + 5] ^= 0xFF  # damage records 1..31 of group 0: record 40 still reads
    assert np.array_equal(codec.decode_groups(bytes(blob), h, offsets, [0], [40])[0], x[[40], :16])
    with pytest.raises(codec.CorruptBlock):
        codec.decode_groups(bytes(blob), h, offsets, [0], [5])


def test_blocks_decode_together_as_they_do_alone():
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 9, (n, sum(WIDTHS)), dtype=np.uint16).cumsum(0, dtype=np.uint16) for n in (8, 8, 5)]
    blobs = [codec.encode_block(x, range(len(x)), WIDTHS, segment=s) for x, s in zip(xs, (4, 4, None))]
    heads = [codec.read_header(b, len(b)) for b in blobs]
    got = codec.decode_blocks([(b, h, o, [0, 3, 8]) for b, (h, o) in zip(blobs, heads)])
    bounds = np.cumsum([0, *WIDTHS])
    for x, per_block in zip(xs, got):
        assert sorted(per_block) == [0, 3, 8]
        for g, arr in per_block.items():
            assert np.array_equal(arr, x[:, bounds[g]:bounds[g + 1]])


def test_bad_frame_tables_are_refused():
    blob = codec.encode_block(np.zeros((4, 8), np.uint16), range(4), [4, 4], segment=2)
    h, _ = codec.read_header(blob, len(blob))
    for table in ([[0, 4, 9, 9], [4, 8, 9, 9]], [[0, 4, 9, 9, 9], [4, 8, 9, 9]]):  # a frame missing
        head = json.dumps(dict({k: v for k, v in h.items() if k != "ranges"}, frames=table)).encode()
        bad = codec.MAGIC + len(head).to_bytes(4, "little") + codec.zlib.crc32(head).to_bytes(4, "little") + head
        with pytest.raises(codec.CorruptBlock):
            codec.read_header(bad, len(bad) + 36)


def test_a_flipped_byte_in_a_one_row_dead_frame_is_detected(tmp_path):
    write(tmp_path)
    rec = Recording(tmp_path)
    s = rec._src.snaps[("wte", "u16")]
    h, offsets = s._header(0)
    dead = len(s.widths) - 1  # the last dead row's group: one row
    assert s.widths[dead] == rec.shape[1] and s.widths[0] == 16 * rec.shape[1]
    path = tmp_path / "recording" / "wte.u16.00000.blk"
    _flip(path, path.stat().st_size - (offsets[dead][1] + offsets[dead][2]) // 2)  # its frame of record 1
    with pytest.raises(DucklingError, match="steps 0..6"):
        Recording(tmp_path).trajectory([V - 1])
    assert Recording(tmp_path).trajectory([0, N_LIVE]).shape[1] == 2  # its neighbours still read


def test_compaction_reads_a_raw_chunk_once_and_refuses_a_short_one(tmp_path):
    """Compaction takes the records where they lie in the raw chunk (every trailer checked) and
    refuses a chunk shorter than the records it is asked for, naming it, instead of reading past it."""
    write(tmp_path, steps=range(B - 1), every=1, close=None)  # killed: chunk 0 raw, B - 1 records
    s = Recording(tmp_path)._src.snaps[("wte", "u16")]
    n = B - 1
    records, steps = s.raw_records(0, n)
    assert records.shape == (n, s.width) and steps.tolist() == list(range(n))
    raw = s.raw_path(0).read_bytes()
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(n, -1)[:, :s.payload].view(np.uint16), records)
    with pytest.raises(codec.CorruptBlock, match="raw chunk 0 holds"):
        s.raw_records(0, n + 1)
    s.raw_path(0).write_bytes(raw[:-1])
    with pytest.raises(codec.CorruptBlock, match="holds"):
        s.raw_records(0, n)


def test_the_decoder_works_where_numba_cannot_cache(monkeypatch):
    """A read-only install and home leave numba no cache folder: the decode loop is then compiled per
    process instead of failing, and decodes the same values."""
    import importlib

    numba = pytest.importorskip("numba")  # the [fast] extra (without it: the numpy decode, tests/test_extras.py)
    from numba.core import caching

    from duckling.recording import kernels

    x = np.arange(5 * 8, dtype=np.uint16).reshape(5, 8) * 3
    blob = codec.encode_block(x, range(5), [4, 4], segment=2)
    h, offsets = codec.read_header(blob, len(blob))
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    try:
        with pytest.raises(RuntimeError, match="no locator"):  # what numba does without a cache folder
            numba.njit(cache=True)(lambda a: a)
        importlib.reload(kernels)
        assert type(kernels.decode_range._cache).__name__ == "NullCache"  # compiled, not cached
        got = codec.decode_groups(blob, h, offsets, [0, 1])
        assert np.array_equal(np.concatenate([got[0], got[1]], axis=1), x)
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)
