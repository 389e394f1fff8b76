# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-batch security stage between the codec and the engine (PROTOCOL.md §3.3):

  registered (97) → signed on (77, header asks for a sign-on) → request MAC (A0; after three
  bad MACs in a row the terminal must sign on again) → PIN block (99 when malformed; else the
  PIN's verification value goes into the request row and the engine decides 55 / 75).

Then, after the engine and the encoder, every reply to a signed-on terminal gets its MAC.
MACs and PIN blocks of a whole batch go through the bitsliced DES of _des in one call each
(PROTOCOL.md's per-message budget cannot afford one DES call per block per message).
The PAN digits and the PIN block are zeroed in the Wire rows as soon as the PIN is checked.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport malloc, free
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
cimport numpy as cnp
import numpy as np

from yikatong.engine._core cimport Request, siphash24, RC_30, RC_77, RC_97, RC_99, RC_A0, REQ_PIN
from yikatong.protocols._codec cimport (Wire, WK_ENGINE, WK_INVALID, WF_MAC_REPLY, WF_RESIGN,
                                        WF_NO_REPLY, WF_PIN)
from yikatong.protocols._des cimport mac_many, tdes_ecb_many, pin_from_block

cnp.import_array()

cdef enum:
    BAD_MACS_MAX = 3  # consecutive bad MACs before the terminal must sign on again (§3.3)


cdef class TerminalKeys:
    """Session state of every registered terminal, one row each (index = registry order):
    signed on, PIN key, MAC key (both clear in memory only — never written anywhere), MAC
    algorithm, consecutive bad MACs. Sign-on fills a row; three bad MACs or a sign-off clear it."""
    cdef readonly object signed_on, pin_key, mac_key, mac_alg, bad_macs
    cdef uint8_t* _signed_on
    cdef uint8_t* _pin_key
    cdef uint8_t* _mac_key
    cdef uint8_t* _mac_alg
    cdef uint8_t* _bad_macs
    cdef readonly int count

    def __init__(self, mac_algorithms not None):
        self.count = len(mac_algorithms)
        self.signed_on = np.zeros(max(1, self.count), np.uint8)
        self.pin_key = np.zeros((max(1, self.count), 16), np.uint8)
        self.mac_key = np.zeros((max(1, self.count), 16), np.uint8)
        self.mac_alg = np.ascontiguousarray(mac_algorithms, dtype=np.uint8) if self.count else np.zeros(1, np.uint8)
        self.bad_macs = np.zeros(max(1, self.count), np.uint8)
        self._signed_on = <uint8_t*>cnp.PyArray_DATA(self.signed_on)
        self._pin_key = <uint8_t*>cnp.PyArray_DATA(self.pin_key)
        self._mac_key = <uint8_t*>cnp.PyArray_DATA(self.mac_key)
        self._mac_alg = <uint8_t*>cnp.PyArray_DATA(self.mac_alg)
        self._bad_macs = <uint8_t*>cnp.PyArray_DATA(self.bad_macs)

    def sign_on(self, int index, bytes pin_key not None, bytes mac_key not None):
        self.pin_key[index] = np.frombuffer(pin_key, np.uint8)
        self.mac_key[index] = np.frombuffer(mac_key, np.uint8)
        self.bad_macs[index] = 0
        self.signed_on[index] = 1

    cdef inline bint _count_mac(self, int32_t t, bint ok) noexcept nogil:
        """One MAC checked: a good one resets the count; the third bad one in a row signs the
        terminal off (its next message answers 77). True when that just happened."""
        if ok:
            self._bad_macs[t] = 0
            return False
        self._bad_macs[t] += 1
        if self._bad_macs[t] >= BAD_MACS_MAX:
            self._signed_on[t] = 0
            return True
        return False

    def count_mac(self, int index, bint ok) -> bool:
        """For the management messages checked in Python (server._manage)."""
        if not 0 <= index < self.count:
            raise IndexError(f"terminal index {index}")
        return self._count_mac(index, ok)

    def sign_off(self, int index):
        self.signed_on[index] = 0
        self.pin_key[index] = 0
        self.mac_key[index] = 0


cdef class _Scratch:
    """Per-batch scratch for the batched calls, freed with the object: up to `capacity` MACs
    (message pointer, length, key, algorithm, result, row) and PIN blocks (key, block, row)."""
    cdef const uint8_t** data
    cdef uint32_t* length
    cdef uint8_t* keys
    cdef uint8_t* algs
    cdef uint8_t* macs
    cdef int32_t* rows
    cdef Py_ssize_t count
    cdef uint8_t* pin_keys
    cdef uint8_t* blocks
    cdef int32_t* pin_rows
    cdef Py_ssize_t pins

    def __cinit__(self, Py_ssize_t capacity, bint with_pins):
        capacity += 1
        self.data = <const uint8_t**>malloc(sizeof(uint8_t*) * capacity)
        self.length = <uint32_t*>malloc(sizeof(uint32_t) * capacity)
        self.keys = <uint8_t*>malloc(16 * capacity)
        self.algs = <uint8_t*>malloc(capacity)
        self.macs = <uint8_t*>malloc(8 * capacity)
        self.rows = <int32_t*>malloc(sizeof(int32_t) * capacity)
        if with_pins:
            self.pin_keys = <uint8_t*>malloc(16 * capacity)
            self.blocks = <uint8_t*>malloc(8 * capacity)
            self.pin_rows = <int32_t*>malloc(sizeof(int32_t) * capacity)
        if not (self.data and self.length and self.keys and self.algs and self.macs and self.rows
                and (not with_pins or (self.pin_keys and self.blocks and self.pin_rows))):
            raise MemoryError()

    def __dealloc__(self):
        if self.blocks:
            memset(self.blocks, 0, 8 * self.pins)        # clear PIN blocks (card data) before freeing
        free(self.data); free(self.length); free(self.keys); free(self.algs); free(self.macs); free(self.rows)
        free(self.pin_keys); free(self.blocks); free(self.pin_rows)

    cdef inline void add_mac(self, const uint8_t* data, uint32_t length, const uint8_t* key, uint8_t alg,
                             int32_t row) noexcept nogil:
        self.data[self.count] = data
        self.length[self.count] = length
        memcpy(self.keys + 16 * self.count, key, 16)
        self.algs[self.count] = alg
        self.rows[self.count] = row
        self.count += 1

    cdef inline void run_macs(self) noexcept nogil:
        if self.count:
            mac_many(self.data, self.length, self.keys, 16, self.algs, self.macs, self.count)


cdef inline void gather_reply_macs(_Scratch x, uint8_t* o, Py_ssize_t size, const Wire* w, Py_ssize_t count,
                                   TerminalKeys keys, int32_t row_base) noexcept nogil:
    """Queue field 64 of every reply that carries one (reply_mac set by the encoder), as row
    row_base + i (the key is copied now: the MAC is the one of the keys as they are now)."""
    cdef Py_ssize_t i
    cdef int32_t t
    for i in range(count):
        if w[i].reply_len == 0 or w[i].reply_mac == 0 or w[i].reply_mac + 8 > size:
            continue
        t = w[i].terminal_index
        x.add_mac(o + w[i].reply_mab, w[i].reply_mab_len, keys._mac_key + 16 * t, keys._mac_alg[t],
                  row_base + <int32_t>i)


def check_requests(list frames not None, cnp.ndarray wires not None, cnp.ndarray requests not None,
                   Py_ssize_t count, TerminalKeys keys not None, bytes pvv_key not None,
                   bytearray sign_out=None, cnp.ndarray sign_wires=None, Py_ssize_t sign_count=0):
    """Registered, signed on, MAC, PIN for rows 0..count-1 (kind engine); marks which replies
    carry a MAC. Returns (bad MACs, terminals that must sign on again) counts.

    With `sign_out`, `sign_wires`, `sign_count`: also the reply MACs of an earlier batch (what
    `sign_replies(sign_out, sign_wires, sign_count, keys)` does, same bytes), in the same
    bitsliced MAC call as this batch's request MACs. The server's replies wait for their
    commit anyway, so it signs a batch's replies with the next batch's requests: one call of
    2n lanes instead of two of n, which at open-loop batch sizes costs a third less per MAC
    (X9.19 of 150 bytes, this machine: 277 ns at 256 lanes, 186 ns at 512)."""
    if len(pvv_key) != 16:
        raise ValueError("pvv_key: expecting 16 bytes")
    if PyList_GET_SIZE(frames) < count or wires.shape[0] < count or requests.shape[0] < count:
        raise ValueError("check_requests: fewer frames / rows than count")
    if sign_count and (sign_out is None or sign_wires is None or sign_wires.shape[0] < sign_count
                       or sign_wires.dtype.itemsize != sizeof(Wire)):
        raise ValueError("check_requests: sign_count rows need sign_out and that many sign_wires rows")
    cdef Wire* w = <Wire*>cnp.PyArray_DATA(wires)
    cdef Request* q = <Request*>cnp.PyArray_DATA(requests)
    cdef uint64_t k0 = int.from_bytes(pvv_key[:8], "little"), k1 = int.from_bytes(pvv_key[8:], "little")
    cdef Py_ssize_t i, bad = 0, resign = 0
    cdef int32_t t
    cdef object frame
    cdef _Scratch x = _Scratch(count + sign_count, True)
    cdef uint8_t* so = NULL
    cdef const Wire* sw = NULL
    if sign_count:
        so = <uint8_t*>(<char*>sign_out)
        sw = <const Wire*>cnp.PyArray_DATA(sign_wires)
        # the earlier batch's replies first, as rows -1 - i (this batch's rows are >= 0)
        gather_reply_macs(x, so, len(sign_out), sw, sign_count, keys, -<int32_t>sign_count)
    cdef uint8_t buf[24]
    cdef char pin[16]
    cdef int pin_len, j
    # 1. registered, signed on; gather the MACs to verify
    for i in range(count):
        if w[i].flags & WF_NO_REPLY:
            continue
        t = w[i].terminal_index
        if t < 0 or t >= keys.count:
            if w[i].kind == WK_ENGINE:
                q[i].pre_code = RC_97
            continue
        if not keys._signed_on[t]:
            if w[i].kind == WK_ENGINE:
                q[i].pre_code = RC_77
                w[i].flags |= WF_RESIGN
            continue
        w[i].flags |= WF_MAC_REPLY
        if w[i].kind != WK_ENGINE:
            continue
        if w[i].mac_offset == 0:
            q[i].pre_code = RC_A0
            continue
        frame = <object>PyList_GET_ITEM(frames, i)
        x.add_mac(<const uint8_t*>PyBytes_AS_STRING(frame) + 11, w[i].mab_len, keys._mac_key + 16 * t,
                  keys._mac_alg[t], <int32_t>i)
    with nogil:
        x.run_macs()
        for j in range(x.count):
            i = x.rows[j]
            if i < 0:                            # a reply of the earlier batch: its field 64
                memcpy(so + sw[i + sign_count].reply_mac, x.macs + 8 * j, 8)
                continue
            t = w[i].terminal_index
            if memcmp(x.macs + 8 * j, w[i].mac, 8) != 0:
                q[i].pre_code = RC_A0
                bad += 1
                if keys._count_mac(t, False):    # the next message gets 77
                    w[i].flags |= WF_RESIGN
                    resign += 1
            else:
                keys._count_mac(t, True)
        # 2. PIN blocks of the rows still going ahead
        for i in range(count):
            if (w[i].flags & WF_PIN) and q[i].pre_code == 0 and w[i].kind == WK_ENGINE:
                memcpy(x.pin_keys + 16 * x.pins, keys._pin_key + 16 * w[i].terminal_index, 16)
                memcpy(x.blocks + 8 * x.pins, w[i].pin_block, 8)
                x.pin_rows[x.pins] = <int32_t>i
                x.pins += 1
        if x.pins:
            tdes_ecb_many(x.pin_keys, 16, x.blocks, x.blocks, x.pins, 1)
        for j in range(x.pins):
            i = x.pin_rows[j]
            pin_len = pin_from_block(x.blocks + 8 * j, <const char*>w[i].pan, w[i].pan_len, pin)
            if pin_len < 0:
                q[i].pre_code = RC_99
            else:
                # the verification value the engine compares: SipHash(pvv key, pan_hash + PIN)
                memcpy(buf, &q[i].pan_hash, 8)
                memcpy(buf + 8, pin, pin_len)
                q[i].pin_pvv = <uint32_t>siphash24(k0, k1, buf, 8 + pin_len)
                q[i].flags |= REQ_PIN
            memset(pin, 0, sizeof(pin))
            memset(buf, 0, sizeof(buf))
        for i in range(count):
            memset(w[i].pan, 0, sizeof(w[i].pan))
            memset(w[i].pin_block, 0, 8)
            w[i].pan_len = 0
    return bad, resign


def sign_replies(bytearray out not None, cnp.ndarray wires not None, Py_ssize_t count, TerminalKeys keys not None):
    """Field 64 of every reply that carries one (WF_MAC_REPLY), in one batched MAC call."""
    if wires.shape[0] < count:
        raise ValueError("sign_replies: fewer rows than count")
    cdef Wire* w = <Wire*>cnp.PyArray_DATA(wires)
    cdef uint8_t* o = <uint8_t*>(<char*>out)
    cdef Py_ssize_t i, j, size = len(out)
    cdef _Scratch x = _Scratch(count, False)
    with nogil:
        gather_reply_macs(x, o, size, w, count, keys, 0)
        x.run_macs()
        for j in range(x.count):
            memcpy(o + w[x.rows[j]].reply_mac, x.macs + 8 * j, 8)
    return x.count
