# cython: language_level=3, boundscheck=False, wraparound=False
"""Framing apart from the codec (PROTOCOL.md §1): a 2-byte big-endian length prefix, then that
many bytes (TPDU, header, MTI, bitmap, fields). The framer takes bytes in any chunks — one byte
at a time included — and hands out whole frames; a declared length above the maximum is refused
as soon as the prefix is read, before any of the body is buffered, so a peer can never make it
hold more than frame_bytes_max + 2 bytes.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcpy


class FrameError(ValueError):
    """A stream that cannot be framed: the connection must close. Carries where and what, never
    the bytes themselves (they could hold card data)."""

    def __init__(self, message: str, offset: int, found: int, expected: str):
        super().__init__(f"{message} at stream byte {offset}: found {found}, expecting {expected}")
        self.offset, self.found, self.expected = offset, found, expected


# TPDU (5) + header (6) + MTI (2) + primary bitmap (8): nothing shorter is a message
FRAME_BYTES_MIN = 21


cdef class Framer:
    """`Framer(2048).feed(chunk)` → list of complete frames (bytes, prefix removed).

    >>> f = Framer(2048)
    >>> f.feed(b"\\x00\\x15") + f.feed(bytes(21))
    [b'\\x00\\x00...']                                # doctest: +SKIP
    """
    cdef bytearray buffer            # at most frame_bytes_max + 2 bytes: prefix + one body
    cdef Py_ssize_t used
    cdef Py_ssize_t expect           # body length of the frame in progress, -1 = reading the prefix
    cdef readonly Py_ssize_t frame_bytes_max
    cdef readonly long long stream_offset   # bytes consumed so far (for error locations)
    cdef readonly long long frames

    def __init__(self, Py_ssize_t frame_bytes_max=2048):
        if frame_bytes_max < FRAME_BYTES_MIN or frame_bytes_max > 65535:
            raise ValueError(f"frame_bytes_max {frame_bytes_max}, expecting {FRAME_BYTES_MIN}..65535")
        self.frame_bytes_max = frame_bytes_max
        self.buffer = bytearray(frame_bytes_max + 2)
        self.used = 0
        self.expect = -1
        self.stream_offset = 0
        self.frames = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held now (the server times out a partial frame)."""
        return self.used

    @property
    def frame_begun(self) -> bool:
        """The stream holds bytes beyond the whole frames handed out: part of a length prefix, a
        whole prefix (then pending_bytes is 0), or part of a body. The server times such a
        frame out (limits.partial_frame_timeout_ms)."""
        return self.used > 0 or self.expect >= 0

    def feed(self, data) -> list:
        cdef const unsigned char[:] view = memoryview(data).cast("B")
        cdef Py_ssize_t n = view.shape[0], i = 0, take, length
        cdef unsigned char* buf = self.buffer
        out = []
        while i < n:
            if self.expect < 0 and self.used == 0 and n - i >= 2:
                # The usual case (a terminal's writes hold whole frames): a frame lying whole in
                # this chunk becomes a bytes object straight from the chunk, without passing
                # through the buffer. Anything else (a frame cut by the chunk, a length to refuse)
                # takes the byte-exact path below.
                length = (view[i] << 8) | view[i + 1]
                if FRAME_BYTES_MIN <= length <= self.frame_bytes_max and n - i - 2 >= length:
                    out.append(PyBytes_FromStringAndSize(<const char*>&view[i + 2], length))
                    self.frames += 1
                    i += 2 + length
                    continue
            if self.expect < 0:
                take = 2 - self.used
                if take > n - i:
                    take = n - i
                memcpy(buf + self.used, &view[i], take)
                self.used += take
                i += take
                if self.used < 2:
                    break
                length = (buf[0] << 8) | buf[1]
                if length > self.frame_bytes_max:
                    raise FrameError("declared frame length above the maximum", self.stream_offset + i - 2,
                                     length, f"at most {self.frame_bytes_max}")
                if length < FRAME_BYTES_MIN:
                    raise FrameError("declared frame length below a message's minimum", self.stream_offset + i - 2,
                                     length, f"at least {FRAME_BYTES_MIN}")
                self.expect = length
                self.used = 0
            else:
                take = self.expect - self.used
                if take > n - i:
                    take = n - i
                memcpy(buf + self.used, &view[i], take)
                self.used += take
                i += take
                if self.used == self.expect:
                    out.append(PyBytes_FromStringAndSize(<const char*>buf, self.expect))
                    self.frames += 1
                    self.used = 0
                    self.expect = -1
        self.stream_offset += n
        return out


def frame(body: bytes) -> bytes:
    """Prefix a frame body with its 2-byte big-endian length."""
    if len(body) > 65535:
        raise ValueError(f"frame body {len(body)} bytes, expecting at most 65535")
    return len(body).to_bytes(2, "big") + body
