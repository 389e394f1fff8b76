# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""DES and 3DES, the terminal MACs (ISO 9797-1 algorithm 3 / ANSI X9.19, CUPS-ECB) and ISO 9564
format-0 PIN blocks (PROTOCOL.md §3.3), fast enough to MAC every message in both directions.

The per-message work is done in batches by bitsliced DES (docs/crypto.md): each message of a
batch is one lane of 64-512 parallel DES computations that share every instruction, each lane with
its own key. The C kernel is in _des_kernel.h / _des_bitslice.h (vector types and per-function
CPU targets are C's, not Cython's); this module is its API: the `cdef ... noexcept nogil`
functions in _des.pxd for the codec and the server, and Python wrappers for tests, tools, the load
generator and sign-on (key check values).

    >>> tdes_ecb(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), bytes(8)).hex()   # doctest: +SKIP
    >>> mac_x919(key16, mab)          # 8 bytes, field 64 of an x9.19 terminal
    >>> check_value(key16)            # 4 bytes, the sign-on check value of a working key

Software keys here are for the demo and the tests; in production the terminal master keys live
in an HSM (docs/crypto.md, "Production path").
"""
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "_des_kernel.h" nogil:
    ctypedef struct des_subkeys:
        pass
    void des_init()
    void des_key_schedule(uint64_t key, des_subkeys* sk)
    uint64_t des_block(const des_subkeys* sk, uint64_t block, int decrypt)
    uint64_t des_load_be64(const uint8_t* p)
    void des_store_be64(uint8_t* p, uint64_t v)
    void des_tdes_many(const uint8_t* keys, Py_ssize_t key_stride, const uint8_t* blocks_in,
                       uint8_t* blocks_out, Py_ssize_t n, int decrypt)
    void des_x919_many(const uint8_t* const* data, const uint32_t* length, const uint8_t* keys,
                       Py_ssize_t key_stride, const int32_t* which, Py_ssize_t count, uint8_t* mac_out)
    int des_cpu_path()
    int des_path_max
    int des_path_forced
    int des_scalar_below
    int des_sort_lanes
    enum:
        DES_PATH_AUTO, DES_PATH_SCALAR, DES_PATH_W64, DES_PATH_W128, DES_PATH_W256, DES_PATH_W512

des_init()
des_path_max = des_cpu_path()

# Limits (bytes): one MAB is at most one frame (PROTOCOL.md §1 frames are ≤ 65535 bytes).
MAB_BYTES_MAX = 65535
# mac_many partitions its batch by algorithm in chunks of this many messages (stack arrays)
cdef enum:
    MAC_CHUNK = 2048
    CUPS_CHUNK = 256

# the algorithm codes of mac_batch / mac_many, for Python callers
ALGORITHM_X919 = MAC_X919
ALGORITHM_CUPS_ECB = MAC_CUPS_ECB

PATHS = {"auto": DES_PATH_AUTO, "scalar": DES_PATH_SCALAR, "w64": DES_PATH_W64,
         "w128": DES_PATH_W128, "w256": DES_PATH_W256, "w512": DES_PATH_W512}


class PinBlockError(ValueError):
    """A PIN, PAN or PIN block that cannot be used. The message says what is wrong and where,
    never a digit of the PIN or the PAN (no card data in exceptions or logs)."""


def kernel_paths() -> list:
    """The kernel paths this CPU runs: "scalar", "w64", "w128" and, with AVX2 / AVX-512, "w256",
    "w512" (lanes per bitsliced group)."""
    return [name for name, p in PATHS.items() if p != DES_PATH_AUTO and p <= des_path_max]


def set_lane_sort(enabled: bool = True) -> None:
    """X9.19 lane scheduling: sort each chunk by block count (default) or keep the input order
    (for measuring what the sort buys; the MACs are the same either way)."""
    global des_sort_lanes
    des_sort_lanes = 1 if enabled else 0


def set_kernel_path(name: str = "auto", scalar_below: int = 8) -> None:
    """Force one kernel path for every batch (tests and benchmarks), or "auto": the one-block path
    for batches of fewer than `scalar_below` items, else the narrowest bitsliced width whose lanes
    hold the batch, capped at the widest this CPU has."""
    global des_path_forced, des_scalar_below
    if name not in PATHS:
        raise ValueError(f"kernel path {name!r}, expecting one of {sorted(PATHS)}")
    if PATHS[name] > des_path_max:
        raise ValueError(f"kernel path {name!r} needs CPU features this machine lacks; "
                         f"available: {kernel_paths()}")
    if scalar_below < 0:
        raise ValueError(f"scalar_below {scalar_below}, expecting >= 0")
    des_path_forced = PATHS[name]
    des_scalar_below = scalar_below


# ---------------------------------------------------------------------------------------------
# C API (see _des.pxd)

cdef void tdes_ecb_many(const uint8_t* keys, Py_ssize_t key_stride, const uint8_t* blocks_in,
                        uint8_t* blocks_out, Py_ssize_t n, int decrypt) noexcept nogil:
    des_tdes_many(keys, key_stride, blocks_in, blocks_out, n, decrypt)


cdef inline uint64_t fold_xor(const uint8_t* p, uint32_t length) noexcept nogil:
    """CUPS-ECB step 1: the XOR of every 8-byte block of the zero-padded MAB."""
    cdef uint64_t r = 0
    cdef uint8_t tail[8]
    cdef uint32_t i = 0
    while i + 8 <= length:
        r ^= des_load_be64(p + i)
        i += 8
    if i < length:
        memset(tail, 0, 8)
        memcpy(tail, p + i, length - i)
        r ^= des_load_be64(tail)
    return r


cdef inline void hex_upper(uint64_t v, uint8_t* out16) noexcept nogil:
    cdef const char* digits = b"0123456789ABCDEF"
    cdef int i
    for i in range(16):
        out16[i] = digits[(v >> (60 - 4 * i)) & 15]


cdef void cups_many(const uint8_t* const* data, const uint32_t* length, const uint8_t* keys,
                    Py_ssize_t key_stride, const int32_t* which, Py_ssize_t count,
                    uint8_t* mac_out) noexcept nogil:
    """CUPS-ECB (PROTOCOL.md §3.3): R = XOR of the MAB blocks; H = hex(R), 16 uppercase ASCII;
    E1 = 3DES_K(H[0:8]); E2 = 3DES_K(E1 XOR H[8:16]); MAC = first 8 chars of hex(E2), ASCII.
    Both 3DES steps run over the chunk's messages at once (bitsliced when the chunk is large)."""
    cdef uint8_t keybuf[CUPS_CHUNK * 16]
    cdef uint8_t h[CUPS_CHUNK * 16]
    cdef uint8_t e[CUPS_CHUNK * 8]
    cdef uint8_t hexbuf[16]
    cdef Py_ssize_t base, i, c, j
    cdef int32_t m
    base = 0
    while base < count:
        c = count - base if count - base < CUPS_CHUNK else CUPS_CHUNK
        for i in range(c):
            m = which[base + i]
            memcpy(keybuf + 16 * i, keys + m * key_stride, 16)
            hex_upper(fold_xor(data[m], length[m]), h + 16 * i)
            memcpy(e + 8 * i, h + 16 * i, 8)
        des_tdes_many(keybuf, 16, e, e, c, 0)
        for i in range(c):
            for j in range(8):
                e[8 * i + j] ^= h[16 * i + 8 + j]
        des_tdes_many(keybuf, 16, e, e, c, 0)
        for i in range(c):
            hex_upper(des_load_be64(e + 8 * i), hexbuf)
            memcpy(mac_out + 8 * <Py_ssize_t>which[base + i], hexbuf, 8)
        base += c


cdef void mac_many(const uint8_t* const* data, const uint32_t* length, const uint8_t* keys,
                   Py_ssize_t key_stride, const uint8_t* algorithm, uint8_t* mac_out,
                   Py_ssize_t n) noexcept nogil:
    # split each chunk by algorithm: every X9.19 message of the chunk shares bitsliced groups
    cdef int32_t x919[MAC_CHUNK]
    cdef int32_t cups[MAC_CHUNK]
    cdef Py_ssize_t base, i, end, nx, nc
    base = 0
    while base < n:
        end = base + MAC_CHUNK if base + MAC_CHUNK < n else n
        nx = 0
        nc = 0
        for i in range(base, end):
            if algorithm[i] == MAC_CUPS_ECB:
                cups[nc] = <int32_t>i
                nc += 1
            else:
                x919[nx] = <int32_t>i
                nx += 1
        if nx:
            des_x919_many(data, length, keys, key_stride, x919, nx, mac_out)
        if nc:
            cups_many(data, length, keys, key_stride, cups, nc, mac_out)
        base = end


cdef int pin_from_block(const uint8_t* clear8, const char* pan, int pan_len,
                        char* pin_out) noexcept nogil:
    # ISO 9564-1 format 0: PIN field 0 L P P P P P/F .. F (16 nibbles), PAN field 0000 + the 12
    # rightmost PAN digits excluding the check digit (zero-padded on the left when shorter),
    # PIN block = PIN field XOR PAN field.
    cdef uint8_t field[8]
    cdef int i, length, nibble, d, pan_digits, src
    if pan_len < 1:
        return -1
    memset(field, 0, 8)
    pan_digits = pan_len - 1                       # without the check digit
    for i in range(12):                            # nibble 4 + i of the PAN field
        src = pan_digits - 12 + i
        if src < 0:
            continue
        d = pan[src] - 48
        if d < 0 or d > 9:
            return -1
        field[(i + 4) // 2] |= <uint8_t>(d << (4 if (i % 2) == 0 else 0))
    for i in range(8):
        field[i] ^= clear8[i]
    if (field[0] >> 4) != 0:
        return -1
    length = field[0] & 15
    if length < 4 or length > 12:
        return -1
    for i in range(2, 16):
        nibble = (field[i // 2] >> (4 if (i % 2) == 0 else 0)) & 15
        if i - 2 < length:
            if nibble > 9:
                return -1
            pin_out[i - 2] = <char>(48 + nibble)
        elif nibble != 15:
            return -1
    return length


# ---------------------------------------------------------------------------------------------
# Python API (tests, tools, load generator, sign-on: not per message)

cdef bytes _need(object value, str what, int size, bint multiple):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: {type(value).__name__}, expecting bytes")
    value = bytes(value)
    cdef Py_ssize_t n = len(value)
    if (multiple and n % size) or (not multiple and n != size):
        raise ValueError(f"{what}: {n} bytes, expecting {'a multiple of ' if multiple else ''}{size}")
    return value


def des_ecb(key8, data, decrypt=False) -> bytes:
    """Single DES, ECB, one 8-byte key (parity bits ignored); data a multiple of 8 bytes.

    >>> des_ecb(bytes.fromhex("0123456789ABCDEF"), b"Now is t").hex()
    '3fa40e8a984d4815'
    """
    cdef bytes key = _need(key8, "key", 8, False)
    cdef bytes src = _need(data, "data", 8, True)
    cdef Py_ssize_t n = len(src) // 8, i
    cdef bytes out = bytes(len(src))
    cdef des_subkeys sk
    cdef const uint8_t* s = <const uint8_t*>PyBytes_AS_STRING(src)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    cdef int dec = 1 if decrypt else 0
    cdef const uint8_t* k = <const uint8_t*>PyBytes_AS_STRING(key)
    with nogil:
        des_key_schedule(des_load_be64(k), &sk)
        for i in range(n):
            des_store_be64(o + 8 * i, des_block(&sk, des_load_be64(s + 8 * i), dec))
    return out


def tdes_ecb(key16, data, decrypt=False) -> bytes:
    """3DES (EDE, double-length key K = KL||KR), ECB; data a multiple of 8 bytes."""
    cdef bytes key = _need(key16, "key", 16, False)
    cdef bytes src = _need(data, "data", 8, True)
    cdef bytes out = bytes(len(src))
    cdef Py_ssize_t n = len(src) // 8
    cdef int dec = 1 if decrypt else 0
    cdef const uint8_t* k = <const uint8_t*>PyBytes_AS_STRING(key)
    cdef const uint8_t* s = <const uint8_t*>PyBytes_AS_STRING(src)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    with nogil:
        des_tdes_many(k, 0, s, o, n, dec)
    return out


def tdes_ecb_batch(keys, blocks, decrypt=False):
    """Block i of blocks ((n, 8) uint8) under key i of keys ((n, 16) uint8) → (n, 8) uint8."""
    cdef cnp.ndarray k = np.ascontiguousarray(keys, dtype=np.uint8)
    cdef cnp.ndarray b = np.ascontiguousarray(blocks, dtype=np.uint8)
    if k.ndim != 2 or k.shape[1] != 16:
        raise ValueError(f"keys: shape {np.shape(keys)}, expecting (n, 16)")
    if b.ndim != 2 or b.shape[1] != 8 or b.shape[0] != k.shape[0]:
        raise ValueError(f"blocks: shape {np.shape(blocks)}, expecting ({k.shape[0]}, 8)")
    cdef cnp.ndarray out = np.empty((b.shape[0], 8), dtype=np.uint8)
    cdef Py_ssize_t n = b.shape[0]
    cdef int dec = 1 if decrypt else 0
    with nogil:
        tdes_ecb_many(<const uint8_t*>cnp.PyArray_DATA(k), 16, <const uint8_t*>cnp.PyArray_DATA(b),
                      <uint8_t*>cnp.PyArray_DATA(out), n, dec)
    return out


def mac_batch(keys, messages, algorithms):
    """MACs of messages (list of bytes, the MABs) under keys ((n, 16) uint8) with algorithms
    ((n,) uint8: MAC_X919 = 0, MAC_CUPS_ECB = 1) → (n, 8) uint8, through mac_many."""
    cdef cnp.ndarray k = np.ascontiguousarray(keys, dtype=np.uint8)
    cdef cnp.ndarray a = np.ascontiguousarray(algorithms, dtype=np.uint8)
    cdef Py_ssize_t n = len(messages), i
    if k.ndim != 2 or k.shape[0] != n or k.shape[1] != 16:
        raise ValueError(f"keys: shape {np.shape(keys)}, expecting ({n}, 16)")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"algorithms: shape {np.shape(algorithms)}, expecting ({n},)")
    if n and int(a.max()) > MAC_CUPS_ECB:
        raise ValueError(f"algorithms: value {int(a.max())}, expecting 0 (x9.19) or 1 (cups-ecb)")
    cdef cnp.ndarray ptrs = np.empty(n, dtype=np.uintp)
    cdef cnp.ndarray lens = np.empty(n, dtype=np.uint32)
    cdef cnp.ndarray out = np.empty((n, 8), dtype=np.uint8)
    cdef size_t* p = <size_t*>cnp.PyArray_DATA(ptrs)
    cdef uint32_t* ln = <uint32_t*>cnp.PyArray_DATA(lens)
    cdef bytes m
    for i in range(n):
        m = messages[i]
        if PyBytes_GET_SIZE(m) > MAB_BYTES_MAX:
            raise ValueError(f"messages[{i}]: {PyBytes_GET_SIZE(m)} bytes, expecting at most {MAB_BYTES_MAX}")
        p[i] = <size_t>PyBytes_AS_STRING(m)
        ln[i] = <uint32_t>PyBytes_GET_SIZE(m)
    with nogil:      # `messages` holds the bytes alive for the call
        mac_many(<const uint8_t* const*>p, ln, <const uint8_t*>cnp.PyArray_DATA(k), 16,
                 <const uint8_t*>cnp.PyArray_DATA(a), <uint8_t*>cnp.PyArray_DATA(out), n)
    return out


cdef bytes _mac_one(object key16, object data, uint8_t algorithm):
    cdef bytes key = _need(key16, "key", 16, False)
    cdef bytes mab = bytes(data)
    if len(mab) > MAB_BYTES_MAX:
        raise ValueError(f"data: {len(mab)} bytes, expecting at most {MAB_BYTES_MAX}")
    cdef const uint8_t* ptr = <const uint8_t*>PyBytes_AS_STRING(mab)
    cdef uint32_t length = <uint32_t>len(mab)
    cdef uint8_t out[8]
    cdef const uint8_t* k = <const uint8_t*>PyBytes_AS_STRING(key)
    with nogil:
        mac_many(&ptr, &length, k, 0, &algorithm, out, 1)
    return (<char*>out)[:8]


def mac_x919(key16, data) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC), padding method 1, double-length key:
    single-DES CBC under KL over the zero-padded MAB, then D_KR, E_KL → 8 bytes."""
    return _mac_one(key16, data, MAC_X919)


def mac_cups_ecb(key16, data) -> bytes:
    """The CUPS POS ECB MAC (PROTOCOL.md §3.3) → 8 ASCII hex characters."""
    return _mac_one(key16, data, MAC_CUPS_ECB)


def check_value(key16) -> bytes:
    """Key check value: the first 4 bytes of 3DES(key, 8 zero bytes) (PROTOCOL.md §3.3)."""
    return tdes_ecb(key16, bytes(8))[:4]


def pin_block(pin: str, pan: str) -> bytes:
    """The clear ISO 9564 format-0 PIN block of `pin` (4..12 digits) for `pan` (digits; its 12
    rightmost digits before the check digit enter the block). Encrypt it under the PIN key
    (tdes_ecb) to make field 52."""
    if not isinstance(pin, str) or not pin.isascii() or not pin.isdigit():
        raise PinBlockError("PIN: expecting ASCII digits only")
    if not 4 <= len(pin) <= 12:
        raise PinBlockError(f"PIN: {len(pin)} digits, expecting 4..12")
    if not isinstance(pan, str) or not pan.isascii() or not pan.isdigit() or not pan:
        raise PinBlockError("PAN: expecting one or more ASCII digits")
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    pan_field = _pan_field(pan)
    return bytes(a ^ b for a, b in zip(pin_field, pan_field))


def pin_of_block(clear8, pan: str) -> str:
    """The PIN in a clear format-0 PIN block (already decrypted) for `pan`; PinBlockError when the
    block is malformed, saying which check failed and at which nibble, never the digits."""
    cdef bytes block = _need(clear8, "PIN block", 8, False)
    if not isinstance(pan, str) or not pan.isascii():
        raise PinBlockError("PAN: expecting ASCII digits")
    cdef bytes pan_bytes = pan.encode("ascii")
    cdef char pin[12]
    cdef int length = pin_from_block(<const uint8_t*>PyBytes_AS_STRING(block),
                                     PyBytes_AS_STRING(pan_bytes), <int>len(pan_bytes), pin)
    if length >= 0:
        return pin[:length].decode("ascii")
    raise PinBlockError(_malformed_reason(block, pan))


def _pan_field(str pan) -> bytes:
    """Format-0 PAN field: 0000 + the 12 rightmost PAN digits without the check digit."""
    body = pan[:len(pan) - 1]
    if len(body) > 12:
        body = body[len(body) - 12:]
    return bytes.fromhex("0000" + body.rjust(12, "0"))


cdef str _malformed_reason(bytes block, str pan):
    """Which format-0 check failed, by nibble position only (no digit, no nibble value)."""
    if not pan or not pan.isdigit():
        return "PAN: expecting one or more ASCII digits"
    pan_field = _pan_field(pan)
    field = bytes(a ^ b for a, b in zip(block, pan_field)).hex().upper()
    if field[0] != "0":
        return "PIN block: format nibble is not 0 (expecting format 0)"
    length = int(field[1], 16)
    if not 4 <= length <= 12:
        return "PIN block: PIN length nibble outside 4..12"
    for i in range(2, 2 + length):
        if not field[i].isdigit():
            return f"PIN block: PIN nibble {i} is not a decimal digit"
    for i in range(2 + length, 16):
        if field[i] != "F":
            return f"PIN block: filler nibble {i} is not F"
    return "PIN block: malformed"
