"""The writer process: the one owner of every write transaction on a node's journal once the
node runs (Journal.start_writer).

Why a process (DESIGN.md §4, measured pitfall): a writer *thread* beside the busy apply loop
waits for the GIL after each fsync (0.47 ms alone → 5.7 ms median beside a busy loop). A
process has its own GIL, so commit latency does not depend on what the node's main thread is
doing, and the node can apply batch N+1 while batch N is fsyncing (Journal.submit /
Journal.wait_durable). The node hands each batch's record bytes over in a shared ring (a memfd
both processes map) and sends only a 40-byte message through the pipe; a batch the ring cannot
take (too large, or the ring is full of unacknowledged batches) goes through the pipe as before.
The ring spares the pipe's two copies and a fresh 40 MiB buffer per batch (measured ≈ 0.2 s of
the writer's CPU per million records). The hash chain (BLAKE2b, docs/ledger.md) is computed
here, off the node's main thread.

Protocol (little-endian), node → writer:
    APPEND     : u32 kind=1, u32 business_date, u64 batch_no, u64 first_seq, u64 count, u64 0, records
    APPEND_RING: u32 kind=2, u32 business_date, u64 batch_no, u64 first_seq, u64 count, u64 ring offset
    CLOSE      : u32 kind=3, zeros
A ring region belongs to the writer from its APPEND_RING message until the node has read that
batch's ack (the writer no longer reads it then: the commit copied it into LMDB); the node never
writes a region whose batch is unacknowledged.
writer → node: u64 batch_no, u32 status (0 ok, 1 failed), u32 length, then 32-byte hash (ok)
or a UTF-8 message (failed). Batch 0 is the ready handshake. After a failed commit the writer
reports and exits: nothing after a failed batch is ever committed (fail-stop).

Run as `python -m yikatong.ledger.writer JOURNAL_PATH MAP_SIZE_BYTES PARENT_PID [RING_FD RING_SIZE_BYTES]`;
stdin/stdout are the pipes. It dies with its parent (PR_SET_PDEATHSIG), which LMDB's crash safety allows, and
it inherits the node's flock so a new node cannot open the directory while it might commit.
"""
import ctypes
import gc
import mmap
import os
import queue
import signal
import struct
import sys
import threading
import time

import lmdb

MSG = struct.Struct("<IIQQQQ")
ACK = struct.Struct("<QII")
HEADER = struct.Struct("<QQQII32s32s")   # mirrors journal.HEADER_DTYPE (asserted there)
KIND_APPEND, KIND_APPEND_RING, KIND_CLOSE = 1, 2, 3
RECORD_SIZE_BYTES = 304                  # records.RECORD_DTYPE.itemsize (asserted in journal.py)
PIPE_SIZE_BYTES = 1 << 20                # Linux pipe-max-size default: fewer wake-ups per batch
INBOX_BATCHES_MAX = 64                   # bounded: a slow disk pushes back on the node
GROUP_BATCHES_MAX = 32                   # batches committed in one LMDB transaction at most
RING_SIZE_BYTES = 256 << 20              # the shared ring: six 40 MiB file batches in flight


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
        view = view[os.write(fd, view):]


# Fault injection for tests only: hold every commit this long inside its write transaction
# (a deliberately slow disk), so a test can show that no reply leaves before its batch is durable.
COMMIT_DELAY_S = float(os.environ.get("YIKATONG_FAULT_COMMIT_DELAY_MS", "0") or 0) / 1000


def serve(journal_path: str, map_size_bytes: int, fd_in: int, fd_out: int, ring_fd: int = -1,
          ring_size_bytes: int = 0) -> int:
    from .journal import CHAIN_BLAKE2B, batch_hash, open_env   # the node's own flags and chain
    if COMMIT_DELAY_S:
        sys.stderr.write(f"yikatong writer: FAULT INJECTION: every commit delayed {COMMIT_DELAY_S * 1000:.0f} ms\n")
    env = open_env(journal_path, map_size_bytes, readonly=False)
    journal_db, headers_db = env.open_db(b"journal", create=False), env.open_db(b"headers", create=False)
    meta_db = env.open_db(b"meta", create=False)
    with env.begin() as txn:                  # (the node refused to open a ledger whose chain it does not know)
        chain_fn = bytes(txn.get(b"chain_hash", db=meta_db) or CHAIN_BLAKE2B)
    with env.begin() as txn:
        cur = txn.cursor(db=headers_db)
        if cur.last():
            batch_no, _, last_seq, business_date, _, _, prev = HEADER.unpack(cur.value())
        else:
            batch_no, last_seq, business_date, prev = 0, 0, 0, bytes(32)
    # The shared ring, read-only here: a stray write of this process cannot touch a batch.
    # (MAP_POPULATE: the node allocated the pages; mapped here now, not by a fault per page later)
    ring = memoryview(mmap.mmap(ring_fd, ring_size_bytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ)) if ring_fd >= 0 else None
    write_all(fd_out, ACK.pack(0, 0, 32) + prev)            # ready

    # A reader thread drains the pipe while the main thread is inside a commit, so the node's
    # send of batch N+1 does not wait for batch N's fsync (pipelining, DESIGN.md §5). It also
    # computes the hash chain, in arrival order (the order of commits), so batch N+1's hash
    # overlaps batch N's fsync. A pipe batch is read into one preallocated buffer (no join).
    #
    # Per batch this costs the writer's CPU more than its records do at the server's batch sizes
    # (≈ 140 µs per batch measured with queue.Queue, a threading.Event per batch and the cyclic
    # GC, half of it in the interpreter): hence a SimpleQueue (C), tuples, no per-batch Event (the
    # hash, ≈ 0.2 µs per record in C, is done before the batch is queued), and no cyclic GC (the
    # writer makes no reference cycles; everything is freed by reference counting).
    inbox = queue.SimpleQueue()
    queued, taken = [0], [0]                  # batches put / got: the reader waits beyond the bound
    chain = [prev]
    gc.disable()

    def reader():
        while True:
            head = read_exact(fd_in, MSG.size)
            if head is None:
                inbox.put(None)
                return
            kind, a, b, c, d, offset = MSG.unpack(head)
            if kind == KIND_APPEND_RING and ring is not None:
                if offset + d * RECORD_SIZE_BYTES > len(ring) or d <= 0:
                    inbox.put(None)            # a programmer error in the node: stop, commit nothing
                    return
                # the records where the node put them: hashed here and, in the main thread, put
                # into LMDB straight from the ring (no copy here)
                payload = ring[offset:offset + d * RECORD_SIZE_BYTES]
            elif kind == KIND_APPEND and d > 0:
                payload = bytearray(d * RECORD_SIZE_BYTES)
                view = memoryview(payload)
                got = 0
                while got < len(payload):
                    n = os.readv(fd_in, [view[got:]])
                    if not n:
                        inbox.put(None)        # the node died mid-batch: nothing of it is committed
                        return
                    got += n
            else:
                inbox.put(None)
                return
            digest = batch_hash(chain[0], payload, chain_fn)
            # bounded: a slow disk pushes back on the node (it stops being read, its sends block,
            # and its ring fills); polled, as this is reached only INBOX_BATCHES_MAX behind
            while queued[0] - taken[0] >= INBOX_BATCHES_MAX:
                time.sleep(0.0005)
            inbox.put((a, b, c, d, payload, chain[0], digest))
            queued[0] += 1
            chain[0] = digest

    def read_all():
        try:
            reader()
        except BaseException as e:  # noqa: BLE001 — the main thread fails the next batch with it
            inbox.put(f"{type(e).__name__}: {e}")

    threading.Thread(target=read_all, daemon=True).start()
    while True:
        msg = inbox.get()
        taken[0] += 1
        if msg is None:
            env.close()
            return 0
        if isinstance(msg, str):                  # the reader failed: nothing more is committed
            _fail(fd_out, batch_no + 1, f"reading or hashing batch {batch_no + 1} failed ({msg}); "
                                        f"the node stops (fail-stop)")
            env.close()
            return 4
        # Group commit across batches: whatever else is already queued joins this transaction
        # (each batch keeps its own header and place in the chain, and its own ack). Under load
        # this amortises one commit's fsyncs over every batch that arrived during the previous
        # one, so a batch waits at most about one commit for its turn, not one per queued batch.
        group = [msg]
        stop = False
        while len(group) < GROUP_BATCHES_MAX:
            try:
                more = inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(more, str):
                inbox.put(more)                   # after this group: fail the batch after it
                break
            taken[0] += 1
            if more is None:
                stop = True
                break
            group.append(more)
        bno = group[0][1]
        try:
            acks = []
            with env.begin(write=True) as txn:
                for date, bno, first, count, payload, payload_prev, digest in group:
                    # Pair assertions before the commit: the node and the stored chain agree.
                    if bno != batch_no + 1 or first != last_seq + 1 or count <= 0:
                        raise RuntimeError(f"batch {bno} (sequences {first}.. count {count}) does not follow "
                                           f"batch {batch_no} ending at {last_seq}")
                    if date < business_date:
                        raise RuntimeError(f"business date {date} before the previous {business_date}")
                    (s0,) = struct.unpack_from("<Q", payload, 0)
                    (s1,) = struct.unpack_from("<Q", payload, (count - 1) * RECORD_SIZE_BYTES)
                    if (s0, s1) != (first, first + count - 1):
                        raise RuntimeError(f"records carry sequences {s0}..{s1}, the batch says {first}..{first + count - 1}")
                    assert payload_prev == prev          # the reader chained in commit order
                    # append=True is MDB_APPEND: put returns False (and stores nothing) when the key
                    # is not after the last one, so every return value is checked.
                    if not txn.put(first.to_bytes(8, "big"), payload, db=journal_db, append=True):
                        raise RuntimeError(f"journal put for sequence {first} refused (out of order)")
                    header = HEADER.pack(bno, first, first + count - 1, date, count, prev, digest)
                    if not txn.put(bno.to_bytes(8, "big"), header, db=headers_db, append=True):
                        raise RuntimeError(f"header put for batch {bno} refused (out of order)")
                    batch_no, last_seq, business_date, prev = bno, first + count - 1, date, digest
                    acks.append(ACK.pack(bno, 0, 32) + digest)
                if COMMIT_DELAY_S:
                    time.sleep(COMMIT_DELAY_S)
            # the with-block committed (sync=True, metasync=True: fsync'd) — now acknowledge
            write_all(fd_out, b"".join(acks))
            if stop:
                env.close()
                return 0
        except lmdb.MapFullError:
            _fail(fd_out, group[0][1], f"the ledger is full: map_size is {map_size_bytes} bytes. Nothing of batch "
                               f"{group[0][1]} or later was written and nothing acknowledged is lost. Restart the "
                               f"node with a larger map_size (ledger.map_size_bytes in the config)")
            env.close()
            return 3
        except Exception as e:  # noqa: BLE001 — any failure stops the writer (fail-stop)
            _fail(fd_out, group[0][1], f"commit failed ({type(e).__name__}: {e}); the node stops (fail-stop)")
            env.close()
            return 4


def _fail(fd_out: int, bno: int, message: str):
    text = message.encode()
    try:
        write_all(fd_out, ACK.pack(bno, 1, len(text)) + text)
    except OSError:
        pass


# glibc's malloc serves a request above its mmap threshold (at most 32 MiB, adjusted at run time)
# with fresh pages and unmaps them on free. LMDB mallocs every batch's overflow pages (40 MiB for
# a 131,072-record file batch): each put then faulted in 10,240 fresh pages, measured 0.20–0.22 s
# per million records; kept in the heap and reused, 0.06 s. At most GROUP_BATCHES_MAX batches
# are held at once, so the heap stays bounded by what one group commits.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD_BYTES = 1 << 30


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.prctl(1, signal.SIGKILL)                               # PR_SET_PDEATHSIG
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)  # (not glibc: no effect, fine)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MALLOC_MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
    journal_path, map_size_bytes, parent_pid = argv[0], int(argv[1]), int(argv[2])
    ring_fd, ring_size_bytes = (int(argv[3]), int(argv[4])) if len(argv) >= 5 else (-1, 0)
    if os.getppid() != parent_pid:          # the parent died before prctl took effect
        return 5
    return serve(journal_path, map_size_bytes, sys.stdin.fileno(), sys.stdout.fileno(), ring_fd, ring_size_bytes)


if __name__ == "__main__":
    sys.exit(main())
