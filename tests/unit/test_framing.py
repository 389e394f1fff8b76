"""Framing (PROTOCOL.md §1): whole frames from any chunking, one byte at a time included; an
oversize declared length refused on the prefix, before any body is buffered."""
import pytest
from hypothesis import given, settings, strategies as st

from yikatong.protocols._framing import FRAME_BYTES_MIN, FrameError, Framer, frame

BODIES = [bytes([i]) * (21 + i) for i in range(5)] + [bytes(range(256)) * 8]


def test_one_byte_at_a_time():
    stream = b"".join(frame(b) for b in BODIES)
    f = Framer(2048)
    got = []
    for i in range(len(stream)):
        got += f.feed(stream[i:i + 1])
    assert got == BODIES and f.frames == len(BODIES) and f.pending_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=FRAME_BYTES_MIN, max_size=300), min_size=1, max_size=8), st.data())
def test_any_chunking(bodies, data):
    stream = b"".join(frame(b) for b in bodies)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=20))))
    f = Framer(2048)
    got, last = [], 0
    for cut in cuts + [len(stream)]:
        got += f.feed(stream[last:cut])
        last = cut
    assert got == bodies


def test_oversize_is_refused_on_the_prefix():
    f = Framer(2048)
    assert f.feed(frame(BODIES[0])) == [BODIES[0]]
    with pytest.raises(FrameError) as e:
        f.feed(b"\x08\x01")                 # 2049 declared, not a byte of the body sent
    assert str(e.value) == "declared frame length above the maximum at stream byte 23: found 2049, expecting at most 2048"
    assert f.pending_bytes == 2             # the prefix only: the connection closes now


def test_short_declared_length_is_refused():
    with pytest.raises(FrameError, match="below a message's minimum at stream byte 0: found 5, expecting at least 21"):
        Framer(2048).feed(b"\x00\x05" + bytes(5))


def test_errors_never_carry_the_bytes():
    secret = b"6214830000000017=3012" + bytes(10)
    with pytest.raises(FrameError) as e:
        Framer(64).feed(frame(secret * 4))
    assert "6214" not in str(e.value) and "6214" not in repr(e.value.args)


def test_bounded_buffer():
    f = Framer(100)
    assert f.feed(b"\x00\x64" + bytes(99)) == []
    assert f.pending_bytes == 99            # never more than one body
    assert f.feed(b"\x00") == [bytes(100)]


def test_frame_begun_tracks_a_frame_in_progress():
    f = Framer(2048)
    assert not f.frame_begun
    assert f.feed(frame(BODIES[0]) + b"\x00") == [BODIES[0]]      # a whole frame, one prefix byte
    assert f.frame_begun and f.pending_bytes == 1
    assert f.feed(b"\x16") == [] and f.frame_begun and f.pending_bytes == 0   # the prefix only
    assert f.feed(BODIES[1][:5]) == [] and f.frame_begun and f.pending_bytes == 5
    assert f.feed(BODIES[1][5:]) == [BODIES[1]] and not f.frame_begun


def test_whole_frames_in_one_chunk_and_a_cut_one():
    stream = b"".join(frame(b) for b in BODIES)
    f = Framer(2048)
    cut = len(stream) - 100                     # inside the last (2048-byte) body
    assert f.feed(stream[:cut]) == BODIES[:-1] and f.pending_bytes == len(BODIES[-1]) - 100
    assert f.feed(stream[cut:]) == BODIES[-1:] and f.frames == len(BODIES) and f.stream_offset == len(stream)
