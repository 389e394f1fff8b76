# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A terminal client on the Cython codec, for the load generator (`yikatong load`): requests are
built from per-kind templates by patching STAN, PAN, amounts and PIN block in place, and MACed
in one batched call; replies are scanned (MTI, 11, 37, 39, 4) and their MACs checked in one
batched call. Python runs per chunk of messages, never per message — the generator has to
outrun a server doing 150 k messages/s on one core.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport malloc, free
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
cimport numpy as cnp
import numpy as np

from yikatong.protocols._codec cimport Wire, Loc, parse_fields, put_bcd, put_ascii_digits
from yikatong.protocols._des cimport mac_many, tdes_ecb_many
from yikatong.protocols import _codec

cnp.import_array()

KIND_MED, KIND_PRE, KIND_BAL = 0, 1, 2
KIND_NAMES = ("med_settle", "med_presettle", "balance")
REPLY_DTYPE = np.dtype([("stan", "<u4"), ("mti", "<u2"), ("code", "S2"), ("mac_ok", "u1"),
                        ("decoded", "u1"), ("rrn", "<u8"), ("amount_fen", "<i8")], align=True)
assert REPLY_DTYPE.fields["rrn"][1] == 16 and REPLY_DTYPE.fields["amount_fen"][1] == 24 and REPLY_DTYPE.itemsize == 32
cdef enum:
    KINDS = 3
    IS_DIGITS = 6                 # fixed width of the IS amount in the template (amount ≤ 999999 fen)


cdef class RequestFactory:
    """Request frames (length prefix included) of one terminal: medical settlement (81),
    pre-settlement (83) and balance inquiry (PIN under the session PIN key), for cards given as
    an (n, 16) ASCII PAN array."""
    cdef tuple templates
    cdef const uint8_t* tpl_bytes[3]     # into `templates`' bytes (kept alive by it)
    cdef int tlen[3], off_stan[3], off_pan[3], off_amount[3], off_is[3], off_pin[3], off_mac[3]
    cdef uint8_t mac_key[16]
    cdef uint8_t pin_key[16]
    cdef uint8_t alg
    cdef object pans_bcd, pin_fields
    cdef uint8_t* _pans_bcd          # (cards, 8) PAN as 16 BCD digits
    cdef uint8_t* _pin_fields        # (cards, 8) ISO 9564 format-0 PIN field XOR PAN field, clear
    cdef readonly int64_t cards

    def __init__(self, str tid, str mid, int batch_no, pans not None, bytes mac_key not None,
                 bytes pin_key not None, int mac_algorithm, str pin="888888", bytes tpdu=b"\x60\x00\x01\x00\x00"):
        from yikatong.protocols._codec import encode_fields, field_offsets
        pans = np.ascontiguousarray(pans, dtype=np.uint8)
        if pans.ndim != 2 or pans.shape[1] != 16:
            raise ValueError("pans: expecting an (n, 16) ASCII digit array")
        self.cards = pans.shape[0]
        digits = (pans - 48).astype(np.uint8)
        self.pans_bcd = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])
        self._pans_bcd = <uint8_t*>cnp.PyArray_DATA(self.pans_bcd)
        # format 0: PIN field (0, length, PIN digits, F filler) XOR PAN field (0000 + the 12
        # rightmost digits without the check digit)
        pin_field = bytes.fromhex(("%02d" % len(pin) + pin).ljust(16, "F"))
        pan_field = np.zeros((self.cards, 8), np.uint8)
        pan12 = digits[:, 3:15]
        pan_field[:, 2:] = (pan12[:, 0::2] << 4) | pan12[:, 1::2]
        self.pin_fields = np.ascontiguousarray(pan_field ^ np.frombuffer(pin_field, np.uint8))
        self._pin_fields = <uint8_t*>cnp.PyArray_DATA(self.pin_fields)
        memcpy(self.mac_key, <char*>mac_key, 16)
        memcpy(self.pin_key, <char*>pin_key, 16)
        self.alg = mac_algorithm
        tlv = b"MT00211FO0010OL0010PS0010IS%03d%s" % (IS_DIGITS, b"0" * IS_DIGITS)
        common = {"tpdu": tpdu, "header": b"\x60\x31\x00\x00\x00\x00", "2": "6" * 16, "11": "000000",
                  "12": "120000", "13": "1130", "25": "00", "41": tid, "42": mid, "49": "156", "64": bytes(8)}
        specs = (
            dict(common, t="0200", **{"3": "000000", "4": "0" * 12, "22": "022", "60": "81%06d000" % batch_no, "62": tlv}),
            dict(common, t="0200", **{"3": "300000", "4": "0" * 12, "22": "022", "60": "83%06d000" % batch_no, "62": tlv}),
            dict(common, t="0200", **{"3": "310000", "22": "021", "52": bytes(8), "53": "2600000000000000",
                                      "60": "01%06d000" % batch_no}),
        )
        built = []
        for k, fields in enumerate(specs):
            body = encode_fields(fields)
            offs = field_offsets(body)
            built.append(len(body).to_bytes(2, "big") + body)
            self.tlen[k] = len(body) + 2
            self.off_stan[k] = offs[11][0] + 2
            self.off_pan[k] = offs[2][0] + 2
            self.off_amount[k] = offs[4][0] + 2 if 4 in offs else -1
            self.off_is[k] = offs[62][0] + 2 + offs[62][1] - IS_DIGITS if 62 in offs else -1
            self.off_pin[k] = offs[52][0] + 2 if 52 in offs else -1
            self.off_mac[k] = offs[64][0] + 2
        self.templates = tuple(built)
        for k in range(KINDS):
            self.tpl_bytes[k] = <const uint8_t*>PyBytes_AS_STRING(self.templates[k])

    def frame_bytes_max(self) -> int:
        return max(self.tlen[0], self.tlen[1], self.tlen[2])

    cdef int _check(self, const uint8_t[:] kinds, const uint32_t[:] stans, const int64_t[:] cards,
                    const int64_t[:] amounts, bytearray out) except -1:
        cdef Py_ssize_t n = kinds.shape[0], i
        if stans.shape[0] < n or cards.shape[0] < n or amounts.shape[0] < n:
            raise ValueError("build: arrays shorter than kinds")
        if len(out) < n * self.frame_bytes_max():
            raise ValueError("build: out too small")
        for i in range(n):
            if kinds[i] >= KINDS or cards[i] < 0 or cards[i] >= self.cards or amounts[i] < 0 or amounts[i] > 999999:
                raise ValueError(f"build: row {i}: kind, card or amount out of range")
        return 0

    cdef Py_ssize_t _fill(self, const uint8_t[:] kinds, const uint32_t[:] stans, const int64_t[:] cards,
                          const int64_t[:] amounts, uint8_t* o, const uint8_t** data, uint32_t* length,
                          uint8_t* algs, uint8_t* keys, uint8_t** mac_to) noexcept nogil:
        """The frames of rows 0..n-1 at `o`, PIN blocks encrypted, MACs not yet computed: row i's
        MAC input is data[i] / length[i], its key keys[16i:16i+16], its MAC goes to mac_to[i].
        Returns the bytes written. (Checked by _check first.)"""
        cdef Py_ssize_t n = kinds.shape[0], i, pos = 0, npin = 0, j
        cdef int k
        cdef int64_t card
        cdef uint8_t* blocks = <uint8_t*>malloc(8 * (n + 1))
        cdef int32_t* pin_at = <int32_t*>malloc(sizeof(int32_t) * (n + 1))
        cdef const uint8_t* tpl[3]
        for k in range(KINDS):
            tpl[k] = self.tpl_bytes[k]
        for i in range(n):
            k = kinds[i]
            card = cards[i]
            memcpy(o + pos, tpl[k], self.tlen[k])
            put_bcd(o + pos + self.off_stan[k], stans[i], 6)
            memcpy(o + pos + self.off_pan[k], self._pans_bcd + 8 * card, 8)
            if self.off_amount[k] >= 0:
                put_bcd(o + pos + self.off_amount[k], <uint64_t>amounts[i], 12)
                put_ascii_digits(o + pos + self.off_is[k], <uint64_t>amounts[i], IS_DIGITS)
            if self.off_pin[k] >= 0:
                memcpy(blocks + 8 * npin, self._pin_fields + 8 * card, 8)
                pin_at[npin] = <int32_t>(pos + self.off_pin[k])
                npin += 1
            data[i] = o + pos + 13
            length[i] = <uint32_t>(self.off_mac[k] - 13)
            algs[i] = self.alg
            memcpy(keys + 16 * i, self.mac_key, 16)
            mac_to[i] = o + pos + self.off_mac[k]
            pos += self.tlen[k]
        # the PIN blocks are in place before the MACs, which cover them
        if npin:
            tdes_ecb_many(self.pin_key, 0, blocks, blocks, npin, 0)
            for j in range(npin):
                memcpy(o + pin_at[j], blocks + 8 * j, 8)
        free(blocks)
        free(pin_at)
        return pos

    def build(self, const uint8_t[:] kinds, const uint32_t[:] stans, const int64_t[:] cards,
              const int64_t[:] amounts, bytearray out not None) -> int:
        """Frames for rows 0..n-1 into `out` (consecutive); returns the bytes written."""
        return build_many([self], [kinds], [stans], [cards], [amounts], [out])[0]


def build_many(list factories not None, list kinds not None, list stans not None, list cards not None,
               list amounts not None, list outs not None) -> list:
    """RequestFactory.build for several terminals (factories[j] into outs[j]) with one MAC pass
    over all their frames: the bitsliced MAC kernel then runs full-width groups instead of one
    group per terminal's handful of frames. Returns the bytes written per factory."""
    cdef Py_ssize_t m = len(factories), j, i, total = 0, at = 0
    cdef RequestFactory f
    if not (len(kinds) == len(stans) == len(cards) == len(amounts) == len(outs) == m):
        raise ValueError("build_many: one kinds, stans, cards, amounts and out per factory")
    for j in range(m):
        f = <RequestFactory?>factories[j]
        f._check(kinds[j], stans[j], cards[j], amounts[j], outs[j])
        total += len(kinds[j])
    cdef const uint8_t** data = <const uint8_t**>malloc(sizeof(uint8_t*) * (total + 1))
    cdef uint32_t* length = <uint32_t*>malloc(sizeof(uint32_t) * (total + 1))
    cdef uint8_t* algs = <uint8_t*>malloc(total + 1)
    cdef uint8_t* keys = <uint8_t*>malloc(16 * (total + 1))
    cdef uint8_t* macs = <uint8_t*>malloc(8 * (total + 1))
    cdef uint8_t** mac_to = <uint8_t**>malloc(sizeof(uint8_t*) * (total + 1))
    cdef list used = []
    try:
        for j in range(m):
            f = <RequestFactory>factories[j]
            used.append(f._fill(kinds[j], stans[j], cards[j], amounts[j], <uint8_t*>(<char*>outs[j]),
                                data + at, length + at, algs + at, keys + 16 * at, mac_to + at))
            at += len(kinds[j])
        with nogil:
            if total:
                mac_many(data, length, keys, 16, algs, macs, total)
            for i in range(total):
                memcpy(mac_to[i], macs + 8 * i, 8)
    finally:
        free(data); free(length); free(algs); free(keys); free(macs); free(mac_to)
    return used


def scan_replies(list frames not None, bytes mac_key not None, mac_algorithm, cnp.ndarray out not None) -> int:
    """Reply frame bodies → rows of REPLY_DTYPE (STAN, MTI, code, RRN, amount, MAC verified);
    returns how many failed to decode or to verify.

    `mac_key`: one 16-byte key for every frame, or 16 bytes per frame (frame i's key at 16·i) so
    that the replies of many connections are verified in one call, the MAC lanes full;
    `mac_algorithm`: an int for every frame, or bytes with one per frame."""
    cdef Py_ssize_t n = PyList_GET_SIZE(frames), i, m = 0, bad = 0
    cdef Py_ssize_t key_stride = 16 if (n > 1 and len(mac_key) == 16 * n) else 0
    cdef bint alg_each = not isinstance(mac_algorithm, int)
    cdef const uint8_t* alg_of = NULL
    cdef int alg_all = 0
    if out.dtype != REPLY_DTYPE or out.shape[0] < n or (len(mac_key) != 16 and len(mac_key) != 16 * n):
        raise ValueError("scan_replies: out must be REPLY_DTYPE with a row per frame; mac_key 16 bytes, or 16 per frame")
    if alg_each:
        if not isinstance(mac_algorithm, bytes) or len(mac_algorithm) != n:
            raise ValueError(f"scan_replies: mac_algorithm: expecting an int or bytes of {n} (one per frame), got {type(mac_algorithm).__name__}")
        alg_of = <const uint8_t*>PyBytes_AS_STRING(mac_algorithm)
    else:
        alg_all = mac_algorithm
    cdef uint8_t* rows = <uint8_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t stride = out.dtype.itemsize
    cdef Loc loc[65]
    cdef Wire w
    cdef const uint8_t* b
    cdef Py_ssize_t size
    cdef uint8_t* r
    cdef uint64_t v
    cdef int d
    cdef const uint8_t** data = <const uint8_t**>malloc(sizeof(uint8_t*) * (n + 1))
    cdef uint32_t* length = <uint32_t*>malloc(sizeof(uint32_t) * (n + 1))
    cdef uint8_t* algs = <uint8_t*>malloc(n + 1)
    cdef uint8_t* macs = <uint8_t*>malloc(8 * (n + 1))
    cdef int32_t* which = <int32_t*>malloc(sizeof(int32_t) * (n + 1))
    cdef const uint8_t** given = <const uint8_t**>malloc(sizeof(uint8_t*) * (n + 1))
    cdef uint8_t* keys = <uint8_t*>malloc(16 * (n + 1))
    cdef const uint8_t* key_all = <const uint8_t*>PyBytes_AS_STRING(mac_key)
    try:
        for i in range(n):
            frame = <object>PyList_GET_ITEM(frames, i)
            b = <const uint8_t*>PyBytes_AS_STRING(frame)
            size = PyBytes_GET_SIZE(frame)
            r = rows + i * stride
            memset(r, 0, stride)
            memset(&w, 0, sizeof(Wire))
            if parse_fields(b, size, loc, &w) < 0 or not (w.present >> 10) & 1 or not (w.present >> 38) & 1:
                bad += 1
                continue
            r[9] = 1                                              # decoded
            v = 0
            for d in range(6):
                v = v * 10 + ((b[loc[11].off + d // 2] >> (4 if d % 2 == 0 else 0)) & 0xF)
            (<uint32_t*>r)[0] = <uint32_t>v                        # stan
            (<uint16_t*>(r + 4))[0] = <uint16_t>(((b[11] >> 4) * 1000) + (b[11] & 0xF) * 100 + (b[12] >> 4) * 10 + (b[12] & 0xF))
            memcpy(r + 6, b + loc[39].off, 2)                      # code
            if (w.present >> 36) & 1:                              # 37: RRN digits
                v = 0
                for d in range(12):
                    v = v * 10 + (b[loc[37].off + d] - 48)
                (<uint64_t*>(r + 16))[0] = v
            if (w.present >> 3) & 1:                               # 4
                v = 0
                for d in range(12):
                    v = v * 10 + ((b[loc[4].off + d // 2] >> (4 if d % 2 == 0 else 0)) & 0xF)
                (<int64_t*>(r + 24))[0] = <int64_t>v
            if (w.present >> 63) & 1:
                data[m] = b + 11
                length[m] = <uint32_t>(loc[64].off - 11)
                algs[m] = alg_of[i] if alg_each else <uint8_t>alg_all
                memcpy(keys + 16 * m, key_all + key_stride * i, 16)      # the MAC'd frames' keys, packed
                given[m] = b + loc[64].off
                which[m] = <int32_t>i
                m += 1
        with nogil:
            if m:
                mac_many(data, length, keys, 16, algs, macs, m)
            for i in range(m):
                if memcmp(macs + 8 * i, given[i], 8) == 0:
                    rows[which[i] * stride + 8] = 1
    finally:
        free(data); free(length); free(algs); free(macs); free(which); free(given); free(keys)
    return bad
