"""The LMDB environment of one node: how it is opened, its sub-databases, the batch header
layout and hash chain, the node lock, and bulk reads of the journal (no per-record Python).

Only the writer process (ledger/writer.py) ever opens a write transaction on the journal; the
node process opens the same environment for reads and, before the writer starts, to create it.
This module imports no numpy at top level so the writer process starts fast.
"""
import errno
import fcntl
import hashlib
import os
import struct

import lmdb

from .records_layout import RECORD_SIZE_BYTES, RECORD_LAYOUT_VERSION

# The on-disk layout of the data directory as a whole (sub-databases, header, meta keys).
# A directory written by a newer version is refused (a newer node may store what we cannot read).
DATA_LAYOUT_VERSION = 1

DB_JOURNAL = b"journal"          # big-endian u64 first seq of a batch → the batch's records
DB_HEADERS = b"batch_headers"    # big-endian u64 batch seq → HEADER (below)
DB_CHECKPOINTS = b"checkpoints"  # big-endian u64 journal seq → checkpoint metadata (JSON)
DB_META = b"meta"                # node metadata: layout version, engine config, sizes
MAX_DBS_NEEDED = 4

# Batch header: batch_seq, first_seq, last_seq, business_date, layout_version, record_size,
# prev_digest, digest. digest = BLAKE2b-256(header bytes up to and including prev_digest ‖ the
# batch's record bytes): each batch commits to its predecessor, so a changed, missing or
# reordered batch breaks every later link (DESIGN.md §4 hash chain).
HEADER_STRUCT = struct.Struct("<QQQIHH32s32s")
HEADER_SIZE_BYTES = HEADER_STRUCT.size                 # 96
HEADER_DIGESTED_BYTES = HEADER_SIZE_BYTES - 32         # everything but the digest itself
GENESIS_DIGEST = bytes(32)                             # prev_digest of batch 1
LOCK_FILE = "node.lock"
DATA_FILE = "data.mdb"


class LedgerError(RuntimeError):
    """An operational error of the ledger; the message says what happened and the remedy."""


class LedgerCorrupt(LedgerError):
    """Stored bytes fail a check: `seq` is where, `expected`/`found` say what."""

    def __init__(self, what: str, seq: int, expected, found, remedy: str = ""):
        self.what, self.seq, self.expected, self.found = what, seq, expected, found
        super().__init__(f"{what} at sequence {seq}: expected {expected}, found {found}"
                         + (f". {remedy}" if remedy else ""))


class LedgerStopped(LedgerError):
    """The writer failed a commit: the node is stopped and acknowledges nothing more."""


def key_u64(n: int) -> bytes:
    # Big-endian so LMDB's byte order is numeric order and append=True (MDB_APPEND) works.
    return n.to_bytes(8, "big")


def batch_digest(header_prefix: bytes, records: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(header_prefix)
    h.update(records)
    return h.digest()


def pack_header(batch_seq: int, first_seq: int, last_seq: int, business_date: int,
                prev_digest: bytes, records) -> bytes:
    prefix = HEADER_STRUCT.pack(batch_seq, first_seq, last_seq, business_date,
                                RECORD_LAYOUT_VERSION, RECORD_SIZE_BYTES, prev_digest,
                                bytes(32))[:HEADER_DIGESTED_BYTES]
    return prefix + batch_digest(prefix, records)


def open_env(data_dir: str, map_size_bytes: int, max_dbs: int, readonly: bool = False) -> lmdb.Environment:
    """Open the node's environment with every durability flag spelled out (STYLE.md rule 6)."""
    if max_dbs < MAX_DBS_NEEDED:
        raise LedgerError(f"max_dbs {max_dbs} is too small: the ledger uses {MAX_DBS_NEEDED} "
                          f"sub-databases. Remedy: set max_dbs ≥ {MAX_DBS_NEEDED}")
    try:
        return lmdb.open(
            data_dir,
            map_size=map_size_bytes,   # upper bound of the data file; a full map fails the commit
                                       # (MapFullError) instead of growing: see Node remedy text
            max_dbs=max_dbs,
            subdir=True,               # data.mdb + lock.mdb inside data_dir
            create=not readonly,       # the node creates only in `init`; open() checks first
            readonly=readonly,
            sync=True,                 # fsync data at every commit: a commit that returned is
                                       # on disk (durability of each acknowledged batch)
            metasync=True,             # fsync the meta page too: the commit's root pointer is
                                       # durable, not just its pages (no lost last commit)
            writemap=False,            # pages are written with write(), never through a shared
                                       # writable map: a stray pointer cannot corrupt the file,
                                       # and a torn write leaves the previous root valid
            map_async=False,           # only meaningful with writemap; stated: no async flush
            lock=True,                 # LMDB's reader table and writer mutex (multi-process)
            readahead=True,            # bulk journal reads are sequential
            meminit=False,             # pages are fully written by us; skip zeroing
            max_readers=126,
        )
    except lmdb.Error as e:
        raise LedgerError(f"cannot open the ledger in {data_dir}: {e}. Remedy: check the path "
                          f"and its permissions") from None


def open_dbs(env: lmdb.Environment, create: bool):
    dbs = {}
    for name in (DB_JOURNAL, DB_HEADERS, DB_CHECKPOINTS, DB_META):
        try:
            dbs[name] = env.open_db(name, create=create)
        except lmdb.NotFoundError:
            raise LedgerError(f"{env.path()}: sub-database {name.decode()} is missing: not a "
                              f"yikatong ledger. Remedy: `yikatong init` a new directory") from None
    return dbs


def last_header(txn, headers_db):
    """The newest batch header as a tuple, or None for an empty journal."""
    cur = txn.cursor(headers_db)
    if not cur.last():
        return None
    return HEADER_STRUCT.unpack(cur.value())


class NodeLock:
    """flock on DATA_DIR/node.lock: one running node per data directory. The writer process
    inherits the open file, so the lock is held until both have exited (a new node cannot
    start while an old writer might still commit)."""

    def __init__(self, data_dir: str, wait: bool = False):
        path = os.path.join(data_dir, LOCK_FILE)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LedgerError(f"{data_dir} is in use by another running node (pid {holder or '?'}). "
                                  f"Remedy: stop that node first, or use another data directory") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
