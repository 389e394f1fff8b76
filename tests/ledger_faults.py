"""Corruption of a node's files for the tests that show it is detected (torn or flipped bytes)."""


def flip_byte_in_file(path: str, needle: bytes, offset_in_needle: int):
    """Flip one byte in every copy of `needle` in the file (LMDB keeps older page versions)."""
    data = bytearray(open(path, "rb").read())
    at = data.find(needle)
    assert at >= 0, "the bytes to corrupt were not found in the file"
    while at >= 0:
        data[at + offset_in_needle] ^= 0x40
        at = data.find(needle, at + 1)
    open(path, "wb").write(bytes(data))
