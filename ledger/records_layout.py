"""Sizes of the journal record (records.py holds the numpy dtype), importable without numpy so
the writer process starts fast. records.py asserts they agree."""
RECORD_SIZE_BYTES = 304
RECORD_LAYOUT_VERSION = 1
