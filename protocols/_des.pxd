# DES/3DES, the two terminal MACs and ISO 9564 format-0 PIN blocks: the C API the codec and the
# server cimport (`from yikatong.protocols._des cimport mac_many, ...`). Every function here is
# `noexcept nogil`, allocates nothing on the heap and never fails: inputs are the caller's to
# validate (lengths, key sizes), which the Python wrappers in _des.pyx do.
from libc.stdint cimport uint8_t, uint32_t

cdef enum:
    MAC_X919 = 0      # ISO 9797-1 alg 3 (ANSI X9.19 retail MAC), padding method 1
    MAC_CUPS_ECB = 1  # CUPS POS ECB algorithm, PROTOCOL.md §3.3

# n independent 8-byte blocks; block i under the 16-byte double-length 3DES key at keys + i*key_stride
# (key_stride 0 = one key for all). decrypt != 0 → 3DES decrypt (EDE with reversed roles).
# blocks_out may equal blocks_in (in place).
cdef void tdes_ecb_many(const uint8_t* keys, Py_ssize_t key_stride, const uint8_t* blocks_in,
                        uint8_t* blocks_out, Py_ssize_t n, int decrypt) noexcept nogil

# n MACs: message i is data[i][0:length[i]] (the MAB, zero-padded to a multiple of 8 by the MAC),
# key at keys + i*key_stride, algorithm[i] MAC_X919 or MAC_CUPS_ECB (any other value: MAC_X919,
# the protocol's default); 8 bytes out at mac_out + 8*i.
cdef void mac_many(const uint8_t* const* data, const uint32_t* length, const uint8_t* keys,
                   Py_ssize_t key_stride, const uint8_t* algorithm, uint8_t* mac_out, Py_ssize_t n) noexcept nogil

# ISO 9564 format 0: clear PIN block (already 3DES-decrypted) + the PAN's digits (ASCII) → PIN
# digits (ASCII) in pin_out (≥12 bytes); returns the PIN length 4..12, or -1 on a malformed block
# (format nibble not 0, length outside 4..12, non-digit PIN nibble, filler not F) or a PAN that is
# empty or holds a non-digit.
cdef int pin_from_block(const uint8_t* clear8, const char* pan, int pan_len, char* pin_out) noexcept nogil
