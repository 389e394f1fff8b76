"""The append-only journal: one LMDB environment per node, one value per batch of fixed records,
a hash-chained batch header per batch, written in one transaction and fsynced before append()
returns (group commit: many messages, one write txn, one fsync).

Layout in the environment (DESIGN.md §4):
  journal  key = big-endian u64 first sequence of the batch → the batch's records (RECORD_DTYPE)
  headers  key = big-endian u64 batch number → HEADER_DTYPE
  meta     b"layout_version" → u32; b"created_by" → text; b"chain_hash" → the chain's hash
           function (CHAIN_*, below; absent in ledgers older than it: CHAIN_BLAKE2B)
"""
import collections
import fcntl
import hashlib
import mmap
import os
import struct
import subprocess
import sys

import lmdb
import numpy as np

from . import _chain, _mapped, writer
from .records import RECORD_DTYPE, RECORD_LAYOUT_VERSION

HEADER_DTYPE = np.dtype([
    ("batch_no", "<u8"), ("first_seq", "<u8"), ("last_seq", "<u8"), ("business_date", "<u4"),
    ("record_count", "<u4"), ("prev_hash", "V32"), ("hash", "V32"),
])
ZERO_HASH = bytes(32)
assert HEADER_DTYPE.itemsize == writer.HEADER.size and RECORD_DTYPE.itemsize == writer.RECORD_SIZE_BYTES
MAP_SIZE_BYTES_DEFAULT = 64 << 30          # address space only; the file grows as written
READ_THREADS = min(os.cpu_count() or 1, 2)  # threads copying a bulk read (bench/README-ledger.md §2)


class LedgerError(Exception):
    """An operational error of the ledger; the message says what happened and the remedy."""


class CorruptLedgerError(LedgerError):
    """Stored bytes are not what was written (torn, flipped, truncated): never used silently."""


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


# The hash chain's function, recorded per ledger in meta b"chain_hash" (docs/ledger.md).
# Ledgers written before the key existed used one sequential BLAKE2b-256 (CHAIN_BLAKE2B) and are
# still read and extended with it. New ledgers use BLAKE2b's own tree mode (the BLAKE2 paper
# §2.10, RFC 7693's parameter block) with four leaves, computed in C with the four leaves in the
# lanes of one SIMD register (ledger/_blake2b_tree4.h): 3–4× hashlib's sequential BLAKE2b on one
# core. The sequential hash was 60 % of the writer process's CPU and, per 4,096-record batch,
# 1.6–2 ms that a commit waits for (the header holding it is in the same transaction).
CHAIN_BLAKE2B = b"blake2b-256"
CHAIN_BLAKE2B_TREE4 = b"blake2b-256-tree4"
CHAIN_DEFAULT = CHAIN_BLAKE2B_TREE4
CHAINS = (CHAIN_BLAKE2B, CHAIN_BLAKE2B_TREE4)


def batch_hash(prev_hash: bytes, records, chain: bytes = CHAIN_DEFAULT) -> bytes:
    """The batch's hash over the previous header's hash followed by this batch's record bytes:
    BLAKE2b-256 in tree mode with four leaves (CHAIN_BLAKE2B_TREE4), or sequentially
    (CHAIN_BLAKE2B). Releases the GIL while it hashes."""
    view = memoryview(records).cast("B")
    if not len(view):
        raise ValueError("batch_hash: a batch has at least one record")
    if chain == CHAIN_BLAKE2B_TREE4:
        return _chain.tree4(prev_hash, view)
    if chain == CHAIN_BLAKE2B:
        h = hashlib.blake2b(prev_hash, digest_size=32)
        h.update(view)
        return h.digest()
    raise ValueError(f"batch_hash: unknown chain hash {chain!r}")


def open_env(path: str, map_size_bytes: int, readonly: bool) -> lmdb.Environment:
    """The journal environment with every flag written out; the node and its writer process
    open it with exactly these."""
    return lmdb.open(
        path,
        map_size=map_size_bytes,   # address space reserved for the file; full → MapFullError (see append)
        max_dbs=4,                 # journal, headers, meta
        subdir=True,
        sync=True,                 # fsync the data on every commit: an acknowledged batch survives power loss
        metasync=True,             # fsync the meta page too: the commit itself is durable, not only its data
        writemap=False,            # write through write(2), never through a writable map: a stray
                                   # pointer cannot corrupt the file, and torn pages are not possible
        map_async=False,           # (only with writemap) never let the OS flush the map asynchronously
        readahead=False,           # random reads of batch values; the OS need not read ahead
        lock=True,                 # LMDB's own reader/writer lock table
        meminit=False,             # no need to zero buffers: values are fully written
        max_readers=64,
        readonly=readonly,
    )


class Journal:
    """`Journal(data_dir)` opens an existing ledger; `Journal(data_dir, create=True)` makes one.

    >>> j = Journal("/tmp/node", create=True)      # doctest: +SKIP
    >>> header = j.append(records, business_date=20261124)   # durable when it returns
    """
    ring_size_bytes = writer.RING_SIZE_BYTES   # the writer's shared ring (set before start_writer to change)

    def __init__(self, data_dir: str, *, create: bool = False, map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
                 readonly: bool = False):
        """`readonly=True`: a reader beside a running node (verify, jobs): LMDB's MVCC gives it a
        consistent snapshot per transaction; it takes no node lock and can never write."""
        self.data_dir = os.path.abspath(data_dir)
        if not os.path.isdir(self.data_dir):
            if not create:
                raise LedgerError(f"data directory {self.data_dir} does not exist: give the node's data "
                                  f"directory, or create a node with `yikatong init --data DIR`")
            os.makedirs(self.data_dir)
        if not os.access(self.data_dir, os.R_OK | os.W_OK | os.X_OK):
            raise LedgerError(f"data directory {self.data_dir} is not readable and writable by this user: "
                              f"fix its permissions")
        path = os.path.join(self.data_dir, "journal.lmdb")
        exists = os.path.exists(os.path.join(path, "data.mdb"))
        if not exists and not create:
            raise LedgerError(f"{self.data_dir} holds no ledger (no journal.lmdb): refusing to create an empty "
                              f"one in the wrong place; use `yikatong init --data DIR` for a new node")
        # One running node per data directory: an exclusive, non-blocking lock held while open.
        self._lock_file = None
        if not readonly:
            self._lock_file = open(os.path.join(self.data_dir, "node.lock"), "a+")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise LedgerError(f"data directory {self.data_dir} is in use by another running node "
                                  f"(node.lock is held): stop that node first") from None
        self.map_size_bytes = map_size_bytes
        self.env = open_env(path, map_size_bytes, readonly)
        self._journal_path = path
        self._writer = None
        self._ready_pending = False
        self.journal_db = self.env.open_db(b"journal", create=not readonly)
        self.headers_db = self.env.open_db(b"headers", create=not readonly)
        self.meta_db = self.env.open_db(b"meta", create=not readonly)
        with self.env.begin(write=not readonly) as txn:
            version = txn.get(b"layout_version", db=self.meta_db)
            if version is None and not readonly:
                if not txn.put(b"layout_version", struct.pack("<I", RECORD_LAYOUT_VERSION), db=self.meta_db):
                    raise LedgerError("could not write the layout version")
            elif version is not None:
                stored = struct.unpack("<I", version)[0]
                if stored > RECORD_LAYOUT_VERSION:
                    raise LedgerError(f"{self.data_dir} was written with record layout version {stored}; this "
                                      f"build reads up to version {RECORD_LAYOUT_VERSION}: upgrade yikatong")
            chain = txn.get(b"chain_hash", db=self.meta_db)
            if chain is None and version is None and not readonly:
                chain = CHAIN_DEFAULT                       # a new ledger
                if not txn.put(b"chain_hash", chain, db=self.meta_db):
                    raise LedgerError("could not write the chain hash function")
            elif chain is None:
                chain = CHAIN_BLAKE2B                       # written before the key existed
            elif chain not in CHAINS:
                raise LedgerError(f"{self.data_dir} hash-chains its batches with {chain.decode(errors='replace')!r}, "
                                  f"which this build does not know (it knows "
                                  f"{', '.join(c.decode() for c in CHAINS)}): upgrade yikatong")
            self.chain = bytes(chain)
        self._load_tail()

    # ---- state of the tail ------------------------------------------------------------------
    def _load_tail(self):
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.headers_db)
            if cur.last():
                header = np.frombuffer(cur.value(), dtype=HEADER_DTYPE)[0]
                self.last_batch_no = int(header["batch_no"])
                self.last_seq = int(header["last_seq"])
                self.last_hash = bytes(header["hash"])
                self.last_business_date = int(header["business_date"])
            else:
                self.last_batch_no, self.last_seq, self.last_hash, self.last_business_date = 0, 0, ZERO_HASH, 0

    # ---- the writer process (DESIGN.md §4: commits must not wait for the node's GIL) ---------
    def start_writer(self) -> None:
        """Hand every later commit to a writer process (ledger/writer.py). After this,
        `submit` + `wait_durable` pipeline batches; `append` is both in one call."""
        if self._writer is not None:
            return
        # The shared ring the records go through (writer.py: the pipe carries only messages).
        ring_fd = os.memfd_create("yikatong-journal-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(ring_fd, self.ring_size_bytes)
            # MAP_POPULATE: every page of the ring allocated now (≈ 0.1 s at start-up) instead of
            # a page fault per 4 KiB on the first pass, which measured as the serving loop's worst
            # latencies (open loop 150 k/s: p99 56 ms on a fresh node, 15 ms once the ring was warm)
            self._ring = mmap.mmap(ring_fd, self.ring_size_bytes,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            self._writer = subprocess.Popen(
                [sys.executable, "-m", "yikatong.ledger.writer", self._journal_path, str(self.map_size_bytes),
                 str(os.getpid()), str(ring_fd), str(self.ring_size_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                pass_fds=(self._lock_file.fileno(), ring_fd))   # the writer holds the node lock until it exits
        finally:
            os.close(ring_fd)                  # both processes keep the ring through their mappings
        self._ring_bytes = np.frombuffer(self._ring, np.uint8)
        self._ring_regions = collections.deque()   # (ticket, start, end) of unacknowledged batches
        self._fd_out, self._fd_in = self._writer.stdin.fileno(), self._writer.stdout.fileno()
        try:
            fcntl.fcntl(self._fd_out, 1031, writer.PIPE_SIZE_BYTES)   # F_SETPIPE_SZ
        except OSError:
            pass                                                       # 64 KiB pipes work too
        self.acked_batch_no = self.last_batch_no
        self._pending_hashes = {}
        # The ready handshake (ack 0) is read before the first real ack, not here: the writer's
        # start-up (a Python process importing lmdb and numpy, ≈ 0.15 s) overlaps the node's
        # recovery instead of adding to it. A writer that cannot start fails the first commit.
        self._ready_pending = True

    def submit(self, records: np.ndarray, business_date: int) -> int:
        """Send one batch to the writer process; return its batch number (the ticket). The
        batch is durable only once `wait_durable(ticket)` returned."""
        if self._writer is None:
            self.start_writer()
        first, n = self._check_batch(records, business_date)
        ticket = self.last_batch_no + 1
        raw = np.ascontiguousarray(records).view(np.uint8)
        at = self._ring_place(raw.shape[0])
        try:
            if at is None:                     # no room in the ring: through the pipe
                writer.write_all(self._fd_out, writer.MSG.pack(writer.KIND_APPEND, business_date, ticket, first, n, 0))
                writer.write_all(self._fd_out, raw)
            else:
                if raw.ctypes.data != self._ring_bytes.ctypes.data + at:   # not built in place (ring_records)
                    self._ring_bytes[at:at + raw.shape[0]] = raw
                self._ring_regions.append((ticket, at, at + raw.shape[0]))
                writer.write_all(self._fd_out, writer.MSG.pack(writer.KIND_APPEND_RING, business_date, ticket, first, n, at))
        except OSError:
            self._writer_gone(ticket)
        self.last_batch_no = ticket
        self.last_seq = first + n - 1
        self.last_business_date = business_date
        return ticket

    def ring_records(self, count: int) -> np.ndarray | None:
        """Room for the next batch's `count` records in the writer's ring, where `submit` would
        put them (or None: then build them anywhere). Records built there are not copied again;
        valid until the next `submit`."""
        if self._writer is None:
            return None
        at = self._ring_place(count * RECORD_DTYPE.itemsize)
        if at is None:
            return None
        return self._ring_bytes[at:at + count * RECORD_DTYPE.itemsize].view(RECORD_DTYPE)

    def _ring_place(self, size_bytes: int) -> int | None:
        """Where in the ring `size_bytes` fit without touching an unacknowledged batch's region,
        or None (the caller sends through the pipe: never a wait here, so whoever reads the acks,
        the server's event loop included, keeps its own pace)."""
        regions = self._ring_regions
        while regions and regions[0][0] <= self.acked_batch_no:
            regions.popleft()                  # acknowledged: the writer is done with it
        size = self._ring_bytes.shape[0]
        if not regions:
            return 0 if size_bytes <= size else None
        tail, head = regions[0][1], regions[-1][2]    # live bytes from tail to head, in order
        if head > tail:
            if size - head >= size_bytes:
                return head
            return 0 if tail >= size_bytes else None
        return head if tail - head >= size_bytes else None

    def wait_durable(self, ticket: int) -> None:
        """Block until batch `ticket` (and every earlier one) is committed."""
        while self.acked_batch_no < ticket:
            self._read_ack(self.acked_batch_no + 1)

    def _read_ack(self, expected: int) -> None:
        if getattr(self, "failed", None):
            # fail-stop: after a failed commit, or a broken chain found by the node's background
            # check, no batch is acknowledged any more, even one the writer has committed
            raise LedgerError(f"the journal stopped ({self.failed}); nothing more is acknowledged: "
                              f"restart the node")
        if self._ready_pending:
            # this read is the handshake; callers loop (wait_durable) or are called again when
            # the pipe is readable (the server's add_reader), so the next ack is not awaited here
            self._ready_pending = False
            expected = 0
        try:
            head = writer.read_exact(self._fd_in, writer.ACK.size)
        except (EOFError, OSError):
            head = None
        if head is None:
            self._writer_gone(expected)
        batch_no, status, length = writer.ACK.unpack(head)
        body = writer.read_exact(self._fd_in, length) if length else b""
        if status:
            self.failed = body.decode()
            raise LedgerError(self.failed)
        assert batch_no == expected, (batch_no, expected)
        if batch_no:                       # 0 is the ready handshake
            self.acked_batch_no = batch_no
            self.last_hash = body          # the chain is computed by the writer

    def _writer_gone(self, batch_no: int):
        code = self._writer.poll()
        self.failed = f"the writer process exited (code {code}) before committing batch {batch_no}"
        raise LedgerError(f"{self.failed}; the node stops (fail-stop): restart it to recover from disk")

    def _stop_writer(self):
        if self._writer is None:
            return
        try:
            if not getattr(self, "failed", None):
                self.wait_durable(self.last_batch_no)
        finally:
            try:
                self._writer.stdin.close()             # end of file: the writer closes and exits
            except OSError:
                pass
            try:
                self._writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._writer.kill()
                self._writer.wait()
            self._writer.stdout.close()
            self._writer = None
            self._ring_regions.clear()
            del self._ring_bytes
            try:
                self._ring.close()
            except BufferError:
                pass                           # a caller still holds ring_records' view: unmapped with it

    def _check_batch(self, records: np.ndarray, business_date: int) -> tuple[int, int]:
        if getattr(self, "failed", None):
            raise LedgerError(f"the journal stopped after a failed commit ({self.failed}); restart the node")
        n = records.shape[0]
        if n == 0:
            raise ValueError("append: an empty batch")
        if records.dtype != RECORD_DTYPE:
            raise TypeError(f"append: records of dtype {records.dtype}, expecting RECORD_DTYPE")
        first, last = int(records["seq"][0]), int(records["seq"][-1])
        if first != self.last_seq + 1 or last != first + n - 1:
            raise LedgerError(f"append: batch sequences {first}..{last} do not continue the journal at "
                              f"{self.last_seq} (a programmer error: sequences are assigned by the node)")
        if business_date < self.last_business_date:
            raise LedgerError(f"append: business date {business_date} before {self.last_business_date}")
        return first, n

    # ---- writing ------------------------------------------------------------------------------
    def append(self, records: np.ndarray, business_date: int) -> np.ndarray:
        """Write one batch of records (their `seq` must continue the journal) and its header in
        one transaction; returns the header once the commit is durable. Any failure is final for
        this Journal (fail-stop): nothing after a failed commit is ever acknowledged.
        With the writer process started (`start_writer`), this is submit + wait_durable."""
        if self._writer is not None:
            ticket = self.submit(records, business_date)
            self.wait_durable(ticket)
            with self.env.begin() as txn:
                return np.frombuffer(txn.get(be64(ticket), db=self.headers_db), dtype=HEADER_DTYPE)[0]
        first, n = self._check_batch(records, business_date)
        last = first + n - 1
        payload = np.ascontiguousarray(records).tobytes()
        header = np.zeros(1, dtype=HEADER_DTYPE)
        header["batch_no"] = self.last_batch_no + 1
        header["first_seq"] = first
        header["last_seq"] = last
        header["business_date"] = business_date
        header["record_count"] = n
        header["prev_hash"] = np.void(self.last_hash)
        digest = batch_hash(self.last_hash, payload, self.chain)
        header["hash"] = np.void(digest)
        try:
            with self.env.begin(write=True) as txn:
                # append=True: keys must grow; py-lmdb returns False (and writes nothing) otherwise
                if not txn.put(be64(first), payload, db=self.journal_db, append=True):
                    raise LedgerError(f"journal put for sequence {first} refused (out of order)")
                if not txn.put(be64(self.last_batch_no + 1), header.tobytes(), db=self.headers_db, append=True):
                    raise LedgerError(f"header put for batch {self.last_batch_no + 1} refused (out of order)")
        except lmdb.MapFullError:
            self.failed = "map full"
            raise LedgerError(f"the ledger is full: map_size is {self.map_size_bytes} bytes. Nothing of this batch "
                              f"was written and nothing acknowledged is lost. Restart the node with a larger "
                              f"map_size (ledger.map_size_bytes in the config)") from None
        except lmdb.Error as e:
            self.failed = type(e).__name__
            raise LedgerError(f"commit failed ({type(e).__name__}: {e}); the node stops (fail-stop)") from None
        self.last_batch_no += 1
        self.last_seq = last
        self.last_hash = digest
        self.last_business_date = business_date
        return header[0]

    # ---- reading ------------------------------------------------------------------------------
    def headers(self, first_batch_no: int = 1, last_batch_no: int | None = None) -> np.ndarray:
        """The batch headers first_batch_no..last_batch_no (inclusive; default all), in order."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.headers_db)
            values = []
            if cursor.set_range(be64(first_batch_no)):
                last_key = be64(last_batch_no) if last_batch_no is not None else None
                for key, value in cursor:
                    if last_key is not None and key > last_key:
                        break
                    values.append(value)
        return np.frombuffer(b"".join(values), dtype=HEADER_DTYPE) if values else np.zeros(0, dtype=HEADER_DTYPE)

    def read(self, first: int = 1, last: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Records first..last (inclusive) as one structured array; Python runs per batch.

        Each batch's slice is copied once, straight from the read transaction's memory (buffers=True:
        no bytes object per value) into its place, so a read costs about one memcpy of its bytes.
        `out` (RECORD_DTYPE, at least as many rows) is filled and its head returned: a reader of
        chunks that reuses one buffer also saves the first-touch page faults of a fresh array
        (measured about as much as the copy itself).

        >>> chunk = journal.read(1, 1 << 20, out=buffer)       # doctest: +SKIP
        """
        last = self.last_seq if last is None else min(last, self.last_seq)
        count = max(last - first + 1, 0)
        if out is None:
            out = np.empty(count, dtype=RECORD_DTYPE)
        elif out.dtype != RECORD_DTYPE or out.ndim != 1 or out.shape[0] < count or not out.flags.c_contiguous:
            raise ValueError(f"read: out is {out.dtype} of shape {out.shape}, expecting a contiguous RECORD_DTYPE "
                             f"array of at least {count} rows")
        out = out[:count]
        if count == 0:
            return out
        # Every batch's slice, gathered as memoryviews into the map and copied in one call with
        # the GIL released, on `READ_THREADS` threads (ledger/_mapped.pyx): raw bytes (a
        # structured assignment would go field by field), inside the read transaction that
        # keeps the map's pages valid.
        size = RECORD_DTYPE.itemsize
        with self.env.begin(buffers=True) as txn:
            views = [value[lo * size:hi * size] for value, lo, hi in self._slices_in(txn, first, last)]
            _mapped.copy_slices(out.view(np.uint8), views, READ_THREADS)
        return out

    def feed(self, consumer, first: int = 1, last: int | None = None) -> int:
        """Records first..last in order, as the raw bytes of each batch's slice, straight from the
        read transaction's memory (no copy): `consumer(memoryview)` per batch, valid only during
        the call. For scans that need no array of the whole journal (jobs._totals). Returns the
        number of records fed."""
        last = self.last_seq if last is None else min(last, self.last_seq)
        size = RECORD_DTYPE.itemsize
        filled = 0
        for value, lo, hi in self._slices(first, last):
            consumer(value[lo * size:hi * size] if (lo, hi) != (0, len(value) // size) else value)
            filled += hi - lo
        return filled

    def _slices(self, first: int, last: int):
        """(value, lo, hi) per batch holding records first..last: records lo..hi-1 of the batch's
        value, which is valid until the next step (one read transaction for the whole walk)."""
        if last < first:
            return
        with self.env.begin(buffers=True) as txn:
            yield from self._slices_in(txn, first, last)

    def _slices_in(self, txn, first: int, last: int):
        """`_slices` in the read transaction `txn` (buffers=True): every value stays valid until
        `txn` ends, so a caller may gather them all and use them together."""
        if last < first:
            return
        size = RECORD_DTYPE.itemsize
        filled = 0
        cur = txn.cursor(db=self.journal_db)
        # the batch holding `first`: the last key <= first
        if not cur.set_range(be64(first)) or int.from_bytes(cur.key(), "big") > first:
            if not cur.prev() and not cur.first():
                raise CorruptLedgerError(f"journal: records {first}…{last} missing (the journal is empty)")
        for key, value in cur.iternext(keys=True, values=True):
            start = int.from_bytes(key, "big")
            if start > last:
                break
            length = len(value)
            if length % size:
                raise CorruptLedgerError(f"journal value at sequence {start}: {length} bytes, not a "
                                         f"multiple of the {size}-byte record")
            lo = first - start if first > start else 0
            hi = min(last - start + 1, length // size)
            if hi > lo:
                if start + lo != first + filled:
                    raise CorruptLedgerError(f"journal: sequence {first + filled} expected, batch at "
                                             f"{start} gives {start + lo}")
                yield value, lo, hi
                filled += hi - lo
        if filled != last - first + 1:
            raise CorruptLedgerError(f"journal: records {first + filled}…{last} missing")

    def batches(self):
        """(header, records) of every batch in order — for replay and verify."""
        headers = self.headers()
        with self.env.begin(buffers=True) as txn:
            for header in headers:
                value = txn.get(be64(int(header["first_seq"])), db=self.journal_db)
                if value is None:
                    raise CorruptLedgerError(f"batch {int(header['batch_no'])}: no journal value at sequence "
                                             f"{int(header['first_seq'])}")
                yield header, bytes(value)

    def close(self):
        self._stop_writer()
        self.env.close()
        if self._lock_file is not None:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            finally:
                self._lock_file.close()
