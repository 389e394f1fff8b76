"""The writer process: the one owner of every write transaction on a node's journal.

Why a process (DESIGN.md §4, measured pitfall): a writer *thread* beside the busy apply loop
waits for the GIL after each fsync (0.47 ms alone → 5.7 ms median beside a busy loop). A
process has its own GIL, so commit latency does not depend on what the node is doing. The node
sends each batch's record bytes through a pipe (one copy, ~GB/s) and reads acknowledgements
back; the hash chain is computed here, off the node's main thread.

Protocol (little-endian), node → writer:
    APPEND  : u32 kind=1, u32 business_date, u64 batch_seq, u64 first_seq, u64 count, records
    CKPTMETA: u32 kind=2, u32 length, u64 seq, u64 0, u64 0, JSON bytes (no acknowledgement)
    CLOSE   : u32 kind=3, zeros
writer → node: u64 batch_seq, u32 status (0 ok, 1 failed), u32 length, message (UTF-8).
Batch 0 is the ready handshake after start-up. After a failed commit the writer reports and
exits: nothing after a failed batch is ever committed (fail-stop).

Run as `python -m yikatong.ledger.writer DATA_DIR MAP_SIZE_BYTES MAX_DBS`; stdin/stdout are
the pipes; it dies with its parent (PR_SET_PDEATHSIG), which LMDB's crash safety allows.
"""
import ctypes
import os
import queue
import signal
import struct
import sys
import threading

import lmdb

from .records_layout import RECORD_SIZE_BYTES
from .store import (DB_CHECKPOINTS, DB_HEADERS, DB_JOURNAL, GENESIS_DIGEST, HEADER_STRUCT,
                    key_u64, last_header, open_dbs, open_env, pack_header)

MSG = struct.Struct("<IIQQQ")
ACK = struct.Struct("<QII")
KIND_APPEND, KIND_CKPT_META, KIND_CLOSE = 1, 2, 3
PIPE_SIZE_BYTES = 1 << 20            # ask the kernel for a 1 MiB pipe (Linux pipe-max-size)


def read_exact(fd: int, n: int) -> bytes | None:
    """n bytes from fd, or None at end of file before the first byte."""
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 22))
        if not b:
            if got == 0:
                return None
            raise EOFError(f"pipe closed after {got} of {n} bytes")
        chunks.append(b)
        got += len(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _die_with_parent():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except OSError:
        pass


def serve(data_dir: str, map_size_bytes: int, max_dbs: int, fd_in: int, fd_out: int) -> int:
    env = open_env(data_dir, map_size_bytes, max_dbs)
    dbs = open_dbs(env, create=False)
    with env.begin() as txn:
        h = last_header(txn, dbs[DB_HEADERS])
    if h is None:
        batch_seq, last_seq, business_date, prev = 0, 0, 0, GENESIS_DIGEST
    else:
        batch_seq, _, last_seq, business_date, _, _, _, prev = h
    write_all(fd_out, ACK.pack(0, 0, 0))          # ready

    # A reader thread drains the pipe while the main thread is inside a commit, so the node's
    # send of batch N+1 does not block on batch N's fsync (pipelining, DESIGN.md §5).
    inbox: queue.Queue = queue.Queue(maxsize=64)  # bounded: back-pressure on the node

    def reader():
        while True:
            head = read_exact(fd_in, MSG.size)
            if head is None:
                inbox.put(None)
                return
            kind, a, b, c, d = MSG.unpack(head)
            if kind == KIND_APPEND:
                inbox.put((kind, a, b, c, d, read_exact(fd_in, d * RECORD_SIZE_BYTES)))
            elif kind == KIND_CKPT_META:
                inbox.put((kind, a, b, c, d, read_exact(fd_in, a)))
            else:
                inbox.put(None)
                return

    threading.Thread(target=reader, daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None:
            env.close()
            return 0
        kind, a, b, c, d, payload = msg
        try:
            if kind == KIND_CKPT_META:
                with env.begin(write=True) as txn:
                    if not txn.put(key_u64(b), payload, db=dbs[DB_CHECKPOINTS], overwrite=True):
                        raise RuntimeError("checkpoint metadata put refused")
                continue
            date, bseq, first, count = a, b, c, d
            # Pair assertions before the commit: the node and the stored chain agree.
            if bseq != batch_seq + 1 or first != last_seq + 1 or count <= 0:
                raise RuntimeError(f"batch {bseq} first seq {first} count {count} does not follow "
                                   f"batch {batch_seq} last seq {last_seq}")
            if date < business_date:
                raise RuntimeError(f"business date {date} before the previous {business_date}")
            (s0,) = struct.unpack_from("<Q", payload, 0)
            (s1,) = struct.unpack_from("<Q", payload, (count - 1) * RECORD_SIZE_BYTES)
            if s0 != first or s1 != first + count - 1:
                raise RuntimeError(f"records carry seq {s0}..{s1}, batch says {first}..{first + count - 1}")
            header = pack_header(bseq, first, first + count - 1, date, prev, payload)
            with env.begin(write=True) as txn:
                # append=True is MDB_APPEND: put returns False (and stores nothing) when the key
                # is not after the last one, so every return value is checked.
                if not txn.put(key_u64(first), payload, db=dbs[DB_JOURNAL], append=True):
                    raise RuntimeError(f"journal append refused for seq {first} (out of order)")
                if not txn.put(key_u64(bseq), header, db=dbs[DB_HEADERS], append=True):
                    raise RuntimeError(f"header append refused for batch {bseq} (out of order)")
            # leaving the with-block committed (sync=True: fsync'd) — now acknowledge
            batch_seq, last_seq, business_date, prev = bseq, first + count - 1, date, header[-32:]
            write_all(fd_out, ACK.pack(bseq, 0, 0))
        except lmdb.MapFullError:
            _fail(fd_out, b if kind == KIND_APPEND else 0,
                  f"map full (MDB_MAP_FULL): the ledger reached map_size_bytes={map_size_bytes}. "
                  f"Nothing after batch {batch_seq} was committed. Remedy: raise map_size_bytes in "
                  f"the ledger configuration (Node.open(DIR, map_size_bytes=N) or --map-size-bytes N "
                  f"on the command line; the new size is kept) and restart the node")
            env.close()
            return 3
        except Exception as e:  # noqa: BLE001 — any failure stops the writer (fail-stop)
            _fail(fd_out, b if kind == KIND_APPEND else 0, f"commit failed: {e}")
            env.close()
            return 4


def _fail(fd_out: int, bseq: int, message: str):
    text = message.encode()
    try:
        write_all(fd_out, ACK.pack(bseq, 1, len(text)) + text)
    except OSError:
        pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    data_dir, map_size_bytes, max_dbs, parent_pid = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if os.getppid() != parent_pid:          # the parent died before prctl took effect
        return 5
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    return serve(data_dir, map_size_bytes, max_dbs, fd_in, fd_out)


if __name__ == "__main__":
    sys.exit(main())
