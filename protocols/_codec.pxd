# cython: language_level=3
"""The codec's C contract: the per-message wire record and the decode / encode entry points the
server and the load generator `cimport`. A `Wire` row lives in memory for one batch only and is
never written anywhere: it holds what the reply echoes, where the MACs are, and — until the
security stage has checked the PIN and zeroed them — the PIN block and the PAN digits.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from yikatong.engine._core cimport Request, Result

# ---- what a frame is (Wire.kind): who handles it ----------------------------------------------
cdef enum:
    WK_INVALID = 0       # not decodable: the reply is 30 (or 12), decided by the codec
    WK_ENGINE = 1        # a card transaction: the engine applies it
    WK_SIGNON = 2        # 0800 / 003
    WK_SIGNOFF = 3       # 0820 / 002
    WK_ECHO = 4          # 0820 / 301
    WK_SETTLE = 5        # 0500 / 201 batch settlement
    WK_UPLOAD = 6        # 0320 / 201, 202, 207 batch upload

# ---- Wire.flags -------------------------------------------------------------------------------
cdef enum:
    WF_MAC_REPLY = 1     # the reply carries field 64 (the terminal is signed on)
    WF_RESIGN = 2        # the reply's header asks the terminal to sign on again (nibble 3)
    WF_NO_REPLY = 4      # nothing can be answered (MTI, 11 or 41 unreadable): log and drop
    WF_PIN = 8           # field 52 was present (pin_block, pan hold it until the PIN stage)

# ---- decode errors (Wire.err_what): what was expected ---------------------------------------
cdef enum:
    ERR_NONE = 0
    ERR_SHORT = 1            # the frame ends inside this field (found: bytes left)
    ERR_TPDU = 2             # TPDU id is not 0x60 (found: the byte)
    ERR_HEADER = 3           # header application type is not 60 (found: the byte)
    ERR_BCD = 4              # a nibble that is not a decimal digit (found: the nibble)
    ERR_PAD = 5              # a pad nibble that is not 0 (found: the nibble)
    ERR_LENGTH = 6           # a declared length above the field's maximum (found: the length)
    ERR_SECONDARY = 7        # bitmap bit 1: no secondary bitmap in this dialect
    ERR_UNKNOWN_FIELD = 8    # a field this dialect does not define (err_field says which)
    ERR_TRAILING = 9         # bytes after the last field (found: how many)
    ERR_CHARSET = 10         # a byte outside the field's character set (found: the byte, not for card fields)
    ERR_MISSING = 11         # a required field is absent (err_field says which)
    ERR_VALUE = 12           # a value outside what the field allows (found: the value where safe)
    ERR_TLV = 13             # field 62 TLV malformed (err_offset points into the frame)
    ERR_TLV_TAG = 14         # field 62 tag unknown or repeated (found: the tag's two bytes)
    ERR_ROUTE = 15           # MTI + 3 + 60.1 + 60.3 is no message of PROTOCOL.md §3 (answer 12)
    ERR_TRACK2 = 16          # field 35 without a separator or with a PAN of the wrong length

ctypedef struct Wire:
    uint64_t present             # bit f-1 set: field f was in the request
    int64_t amount_fen           # field 4 as received
    uint32_t proc_code           # field 3
    uint32_t stan                # field 11
    uint32_t local_time          # field 12 hhmmss
    uint32_t batch_no            # 60.2
    uint32_t err_offset          # decode error: byte offset in the frame body (after the length prefix)
    int32_t err_found            # decode error: what was found (a length, a byte, a nibble; never card data); -1 = withheld
    int32_t terminal_index       # registry slot of field 41, -1 unknown
    uint32_t reply_start         # reply: offset of its frame (length prefix included) in the output buffer
    uint32_t reply_mab           # reply: offset of its MTI (the MAB starts there)
    uint32_t reply_mac           # reply: offset of field 64's 8 bytes, 0 = none
    uint16_t reply_len           # reply: frame length with its prefix
    uint16_t reply_mab_len       # reply: MAB length (MTI up to field 64)
    uint16_t mti                 # the 4 digits as a number: 200, 400, 800 ...
    uint16_t local_date          # field 13 MMDD
    uint16_t f60_3               # 60.3 network management code
    uint16_t err_field           # decode error: field number (0: framing, TPDU, header, MTI, bitmap)
    uint16_t err_what            # ERR_*
    uint16_t mab_len             # request: bytes from the MTI to the end of the last field before 64
    uint16_t mac_offset          # request: offset of field 64's 8 bytes in the body, 0 = none
    uint16_t f60_len             # digits of field 60 as received (echoed)
    uint8_t kind                 # WK_*
    uint8_t flags                # WF_*
    uint8_t f60_1                # 60.1 message type code
    uint8_t pan_len              # digits in pan (transient)
    uint8_t tpdu[5]
    uint8_t header[6]
    uint8_t tid[8]               # field 41
    uint8_t mid[15]              # field 42
    uint8_t f39[2]               # reversal reason
    uint8_t f60[9]               # field 60 BCD as received (up to 17 digits), echoed in the reply
    uint8_t mac[8]               # field 64 as received
    uint8_t pin_block[8]         # field 52 (transient: zeroed by the PIN stage)
    uint8_t pan[19]              # PAN digits, ASCII (transient: zeroed by the PIN stage)
    uint8_t reserved0[8]

# Where a field sits in a frame body (parse_fields fills one per field present).
ctypedef struct Loc:
    uint16_t off              # first byte of the data (after the length prefix)
    uint16_t nbytes
    uint16_t units            # digits (n, z) or bytes
    uint8_t nib0              # nibble index of the first digit: 1 for a right-aligned odd field

# Locate and validate every field of a frame body (TPDU onward): 0, or -1 with w.err_* set.
# w.present gets a bit per field found. Used by the codec and by the load generator's reply scan.
cdef int parse_fields(const uint8_t* b, Py_ssize_t n, Loc* loc, Wire* w) noexcept nogil


# Digit tables (C, static in each module that cimports this file): two digits per step instead
# of one, in the writers below and in the codec's readers.
cdef extern from *:
    """
    static const uint8_t yk_bin2bcd[100] = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x90, 0x91, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99};
    static const char yk_digits2[201] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";
    static const uint8_t yk_bcd_ok[256] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    static const uint8_t yk_bcdz_ok[256] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    static const uint8_t yk_bcd2bin[256] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 0, 0, 0, 0, 0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 0, 0, 0, 0, 0, 0, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 0, 0, 0, 0, 0, 0, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 0, 0, 0, 0, 0, 0, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 0, 0, 0, 0, 0, 0, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 0, 0, 0, 0, 0, 0, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 0, 0, 0, 0, 0, 0, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 0, 0, 0, 0, 0, 0, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    """
    const uint8_t* BIN2BCD "yk_bin2bcd"       # 0..99 → packed BCD byte
    const char* DIGITS2 "yk_digits2"          # 0..99 → two ASCII digits at [2i], [2i+1]
    const uint8_t* BCD_OK "yk_bcd_ok"         # byte → 1 if both nibbles are 0..9
    const uint8_t* BCDZ_OK "yk_bcdz_ok"       # the same, nibble D (track 2's separator) allowed too
    const uint8_t* BCD2BIN "yk_bcd2bin"       # packed BCD byte → 0..99 (valid bytes only)


# Writers shared by the codec and the load generator's request builder (_client.pyx).
cdef inline void put_bcd(uint8_t* o, uint64_t v, int digits) noexcept nogil:
    """v as `digits` digits (even), packed BCD, right-aligned with leading zeros."""
    cdef int i
    for i in range(digits // 2 - 1, -1, -1):
        o[i] = BIN2BCD[v % 100]
        v //= 100

cdef inline void put_ascii_digits(uint8_t* o, uint64_t v, int width) noexcept nogil:
    """v as `width` ASCII digits, zero-filled."""
    cdef int i = width - 1
    cdef unsigned two
    while i >= 1:
        two = <unsigned>(v % 100)
        o[i - 1] = <uint8_t>DIGITS2[2 * two]
        o[i] = <uint8_t>DIGITS2[2 * two + 1]
        v //= 100
        i -= 2
    if i == 0:
        o[0] = <uint8_t>(48 + v % 10)
