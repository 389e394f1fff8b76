"""Checkpoint files: the engine's arrays at a journal sequence, written atomically with a
checksum, and read back only when every byte checks.

File layout (DATA_DIR/checkpoints/ckpt-<seq:020d>.ykc):
    magic b"YKTCKPT\\0", u32 format version, u32 JSON length, JSON (seq, batch_seq, the journal
    header digest at seq, and name/dtype/shape/offset of every array), the arrays' raw bytes,
    BLAKE2b-256 of everything before it.
Written as tmp file → fsync → rename → fsync(directory): a crash leaves either the old set of
checkpoints or the new complete file, never a torn one under the final name.
"""
import glob
import hashlib
import os
import struct

import msgspec
import numpy as np

from .store import LedgerCorrupt, LedgerError

MAGIC = b"YKTCKPT\0"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sII")
DIGEST_SIZE_BYTES = 32
CHUNK_BYTES = 8 << 20


class ArraySpec(msgspec.Struct):
    name: str
    descr: str            # numpy dtype description (np.lib.format.dtype_to_descr), as JSON
    shape: list[int]
    offset: int
    nbytes: int


class CheckpointHeader(msgspec.Struct):
    seq: int              # journal sequence the arrays reflect (every record ≤ seq applied)
    batch_seq: int        # batch ending at seq
    header_digest: str    # hex digest of that batch's header: ties the file to this journal
    arrays: list[ArraySpec]


def checkpoint_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "checkpoints")


def checkpoint_path(data_dir: str, seq: int) -> str:
    return os.path.join(checkpoint_dir(data_dir), f"ckpt-{seq:020d}.ykc")


def list_checkpoints(data_dir: str) -> list[tuple[int, str]]:
    """(seq, path) of every finished checkpoint file, newest first (temp files are ignored)."""
    out = []
    for path in glob.glob(os.path.join(checkpoint_dir(data_dir), "ckpt-*.ykc")):
        try:
            out.append((int(os.path.basename(path)[5:25]), path))
        except ValueError:
            continue
    return sorted(out, reverse=True)


def write_checkpoint(data_dir: str, arrays: dict, seq: int, batch_seq: int,
                     header_digest: bytes) -> tuple[str, str]:
    """Write `arrays` (a private copy: nobody may change them meanwhile); return (path, digest hex).

    Runs on a background thread: file writes and hashing of large buffers release the GIL.
    """
    specs, offset = [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        specs.append(ArraySpec(name, msgspec.json.encode(np.lib.format.dtype_to_descr(a.dtype)).decode(),
                               list(a.shape), offset, a.nbytes))
        offset += a.nbytes
    head = msgspec.json.encode(CheckpointHeader(seq, batch_seq, header_digest.hex(), specs))
    os.makedirs(checkpoint_dir(data_dir), exist_ok=True)
    final = checkpoint_path(data_dir, seq)
    tmp = final + f".tmp{os.getpid()}"
    h = hashlib.blake2b(digest_size=DIGEST_SIZE_BYTES)
    with open(tmp, "wb") as f:
        for part in (PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head):
            h.update(part)
            f.write(part)
        for spec in specs:
            view = memoryview(np.ascontiguousarray(arrays[spec.name])).cast("B")
            for i in range(0, len(view), CHUNK_BYTES):
                h.update(view[i:i + CHUNK_BYTES])
                f.write(view[i:i + CHUNK_BYTES])
        digest = h.digest()
        f.write(digest)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    dfd = os.open(checkpoint_dir(data_dir), os.O_RDONLY)
    try:
        os.fsync(dfd)                 # the rename itself is durable
    finally:
        os.close(dfd)
    return final, digest.hex()


def read_checkpoint(path: str) -> tuple[CheckpointHeader, dict]:
    """Load and check a checkpoint; raise LedgerCorrupt naming the file if any byte is off."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
    except OSError as e:
        raise LedgerError(f"checkpoint {path} cannot be read: {e}. Remedy: check permissions") from None
    seq_guess = _seq_of(path)
    remedy = (f"Remedy: move {os.path.basename(path)} out of the checkpoints directory; the node "
              f"then recovers from an older checkpoint or from genesis by replay")
    if len(data) < PREFIX.size + DIGEST_SIZE_BYTES:
        raise LedgerCorrupt(f"checkpoint {path} truncated", seq_guess, "≥ 48 bytes", f"{len(data)} bytes", remedy)
    magic, version, head_len = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise LedgerCorrupt(f"checkpoint {path} magic", seq_guess, MAGIC, bytes(magic), remedy)
    if version > FORMAT_VERSION:
        raise LedgerError(f"checkpoint {path} has format version {version}; this node reads up to "
                          f"{FORMAT_VERSION}. Remedy: run a newer yikatong on this data directory")
    body = memoryview(data)[:-DIGEST_SIZE_BYTES]
    found = hashlib.blake2b(body, digest_size=DIGEST_SIZE_BYTES).hexdigest()
    expected = bytes(data[-DIGEST_SIZE_BYTES:]).hex()
    if found != expected:
        raise LedgerCorrupt(f"checkpoint {path} checksum (BLAKE2b)", seq_guess, expected, found, remedy)
    header = msgspec.json.decode(bytes(data[PREFIX.size:PREFIX.size + head_len]), type=CheckpointHeader)
    base = PREFIX.size + head_len
    arrays = {}
    for spec in header.arrays:
        dtype = np.lib.format.descr_to_dtype(_tuplify(msgspec.json.decode(spec.descr)))
        arrays[spec.name] = np.frombuffer(data, dtype=dtype, count=spec.nbytes // max(dtype.itemsize, 1),
                                          offset=base + spec.offset).reshape(spec.shape)
    return header, arrays


def _tuplify(descr):
    # dtype_to_descr gives lists of tuples (shapes as tuples); JSON turned them into lists
    if isinstance(descr, str):
        return descr
    out = []
    for field in descr:
        typ = field[1] if isinstance(field[1], str) else _tuplify(field[1])
        out.append((field[0], typ, tuple(field[2])) if len(field) == 3 else (field[0], typ))
    return out


def _seq_of(path: str) -> int:
    try:
        return int(os.path.basename(path)[5:25])
    except ValueError:
        return -1
