"""A node's ledger side: create/open a data directory, recover the engine (newest valid
checkpoint + replay of the journal tail through the same apply), apply-and-append batches with
group commit through the writer process, and take checkpoints off the commit path.

    >>> node = Node.init("/tmp/n", demo_config(), card_capacity=1024)       # doctest: +SKIP
    >>> results = node.apply_and_append(requests, business_date=20261124)    # durable on return
    >>> node.close(); node = Node.open("/tmp/n")                             # same engine state
"""
import logging
import os
import subprocess
import sys
import threading
import time

import lmdb
import msgspec
import numpy as np

from yikatong.engine import Engine, NodeConfig

from . import checkpoint as ckpt
from .records import RECORD_DTYPE, RECORD_LAYOUT_VERSION, records_from_batch
from .store import (DATA_FILE, DATA_LAYOUT_VERSION, DB_CHECKPOINTS, DB_HEADERS, DB_JOURNAL,
                    DB_META, GENESIS_DIGEST, HEADER_DIGESTED_BYTES, HEADER_SIZE_BYTES,
                    LedgerCorrupt, LedgerError, LedgerStopped, NodeLock, batch_digest, key_u64,
                    open_dbs, open_env)
from .writer import ACK, KIND_APPEND, KIND_CKPT_META, KIND_CLOSE, MSG, PIPE_SIZE_BYTES, read_exact, write_all

log = logging.getLogger("yikatong.ledger")

HEADER_DTYPE = np.dtype([
    ("batch_seq", "<u8"), ("first_seq", "<u8"), ("last_seq", "<u8"), ("business_date", "<u4"),
    ("layout_version", "<u2"), ("record_size", "<u2"), ("prev_digest", "u1", (32,)),
    ("digest", "u1", (32,)),
])
assert HEADER_DTYPE.itemsize == HEADER_SIZE_BYTES


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Ledger tunables (defaults here are the documented ones)."""
    map_size_bytes: int = 1 << 36            # 64 GiB of address space; the file grows as used
    max_dbs: int = 8                         # the ledger uses 4 sub-databases
    checkpoint_every_records: int = 1_000_000
    checkpoints_kept: int = 2                # older checkpoint files are deleted


class NodeMeta(msgspec.Struct, forbid_unknown_fields=True):
    """What a data directory says about itself (DB_META key b"node")."""
    data_layout_version: int
    record_layout_version: int
    engine_config: NodeConfig
    card_capacity: int
    txn_retention_count: int
    ledger: LedgerConfig


# ---- reading the journal (shared with verify and the jobs) ----------------------------------

def read_headers(env, dbs) -> np.ndarray:
    """Every batch header as a HEADER_DTYPE array (one join, no per-header Python objects kept)."""
    with env.begin(buffers=True) as txn:
        cur = txn.cursor(dbs[DB_HEADERS])
        raw = b"".join(bytes(v) for v in cur.iternext(keys=False, values=True))
    if len(raw) % HEADER_SIZE_BYTES:
        raise LedgerCorrupt("batch header size", -1, f"multiple of {HEADER_SIZE_BYTES}", len(raw))
    return np.frombuffer(raw, dtype=HEADER_DTYPE)


def check_header_chain(headers: np.ndarray) -> None:
    """Vectorised: contiguous batch and record sequences, linked digests, non-decreasing dates.
    Raises LedgerCorrupt at the first broken point."""
    n = headers.shape[0]
    if n == 0:
        return
    too_new = np.flatnonzero(headers["layout_version"] > RECORD_LAYOUT_VERSION)
    if too_new.size:
        i = too_new[0]
        raise LedgerError(f"batch {int(headers['batch_seq'][i])} has record layout version "
                          f"{int(headers['layout_version'][i])}; this node reads up to "
                          f"{RECORD_LAYOUT_VERSION}. Remedy: run a newer yikatong")
    expected_bseq = np.arange(1, n + 1, dtype=np.uint64)
    expected_first = np.concatenate(([np.uint64(1)], headers["last_seq"][:-1] + np.uint64(1)))
    prev_expected = np.concatenate((np.zeros((1, 32), np.uint8), headers["digest"][:-1]))
    checks = (
        ("batch sequence", headers["batch_seq"], expected_bseq, headers["first_seq"]),
        ("record sequence (first of batch)", headers["first_seq"], expected_first, headers["first_seq"]),
    )
    for what, found, expected, at in checks:
        bad = np.flatnonzero(found != expected)
        if bad.size:
            i = bad[0]
            raise LedgerCorrupt(what, int(at[i]), int(expected[i]), int(found[i]))
    bad = np.flatnonzero(headers["last_seq"] < headers["first_seq"])
    if bad.size:
        i = bad[0]
        raise LedgerCorrupt("batch last sequence", int(headers["first_seq"][i]),
                            f"≥ {int(headers['first_seq'][i])}", int(headers["last_seq"][i]))
    bad = np.flatnonzero((headers["prev_digest"] != prev_expected).any(axis=1))
    if bad.size:
        i = bad[0]
        raise LedgerCorrupt("hash chain (prev_digest)", int(headers["first_seq"][i]),
                            bytes(prev_expected[i]).hex(), bytes(headers["prev_digest"][i]).hex())
    bad = np.flatnonzero(headers["business_date"][1:] < headers["business_date"][:-1])
    if bad.size:
        i = bad[0] + 1
        raise LedgerCorrupt("business date order", int(headers["first_seq"][i]),
                            f"≥ {int(headers['business_date'][i - 1])}", int(headers["business_date"][i]))


def batch_records(txn, dbs, header, check_digest: bool = True) -> np.ndarray:
    """The records of one batch as a read-only structured view, checked against its header."""
    first, last = int(header["first_seq"]), int(header["last_seq"])
    value = txn.get(key_u64(first), db=dbs[DB_JOURNAL])
    count = last - first + 1
    if value is None:
        raise LedgerCorrupt("journal batch missing", first, f"{count} records", "no value")
    if len(value) != count * RECORD_DTYPE.itemsize:
        raise LedgerCorrupt("journal batch size (torn record)", first,
                            f"{count * RECORD_DTYPE.itemsize} bytes", f"{len(value)} bytes")
    if check_digest:
        found = batch_digest(header.tobytes()[:HEADER_DIGESTED_BYTES], value)
        if found != header["digest"].tobytes():
            raise LedgerCorrupt("batch digest (BLAKE2b of header + records)", first,
                                header["digest"].tobytes().hex(), found.hex(),
                                "Remedy: restore the data directory from a replica or backup")
    records = np.frombuffer(value, dtype=RECORD_DTYPE)
    seqs = records["seq"]
    if seqs[0] != first or seqs[-1] != last or (count > 1 and np.any(np.diff(seqs) != 1)):
        bad = np.flatnonzero(seqs != np.arange(first, last + 1, dtype=np.uint64))[0]
        raise LedgerCorrupt("record sequence", first + int(bad), first + int(bad), int(seqs[bad]))
    if np.any(records["layout_version"] != RECORD_LAYOUT_VERSION):
        bad = np.flatnonzero(records["layout_version"] != RECORD_LAYOUT_VERSION)[0]
        raise LedgerCorrupt("record layout version", first + int(bad), RECORD_LAYOUT_VERSION,
                            int(records["layout_version"][bad]))
    return records


def read_records(env, dbs, first: int, last: int, out: np.ndarray | None = None) -> np.ndarray:
    """Records first … last (inclusive) as one structured array: one memcpy per batch value."""
    count = last - first + 1
    out = np.empty(count, dtype=RECORD_DTYPE) if out is None else out[:count]
    flat = out.view(np.uint8)
    size = RECORD_DTYPE.itemsize
    filled = 0
    with env.begin(buffers=True) as txn:
        cur = txn.cursor(dbs[DB_JOURNAL])
        if not cur.set_range(key_u64(first)) or int.from_bytes(cur.key(), "big") > first:
            if not cur.prev():           # `first` sits inside the batch before
                raise LedgerError(f"sequence {first} is not in the journal")
        while filled < count:
            batch_first = int.from_bytes(cur.key(), "big")
            value = cur.value()
            skip = first + filled - batch_first
            take = min(len(value) // size - skip, count - filled)
            if skip < 0 or take <= 0:
                raise LedgerError(f"sequence {first + filled} is not in the journal")
            flat[filled * size:(filled + take) * size] = np.frombuffer(value, np.uint8, take * size, skip * size)
            filled += take
            if filled < count and not cur.next():
                raise LedgerError(f"journal ends before sequence {first + filled}")
    return out


def replay_batch(engine: Engine, records: np.ndarray, business_date: int) -> None:
    """Feed one batch's requests back through apply; results must equal the recorded ones."""
    requests = np.ascontiguousarray(records["request"])
    results = engine.apply_batch(requests, business_date=business_date)
    recorded = np.ascontiguousarray(records["result"])
    if results.tobytes() != recorded.tobytes():
        bad = _first_diff(results, recorded)
        raise LedgerCorrupt("replayed result", int(records["seq"][bad]),
                            f"code {int(recorded['code'][bad]):#06x} rrn {int(recorded['rrn'][bad])}",
                            f"code {int(results['code'][bad]):#06x} rrn {int(results['rrn'][bad])}",
                            "The engine is not deterministic or the journal was altered")


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    rows_a = a.view(np.uint8).reshape(a.shape[0], -1)
    rows_b = b.view(np.uint8).reshape(b.shape[0], -1)
    return int(np.flatnonzero((rows_a != rows_b).any(axis=1))[0])


# ---- the node --------------------------------------------------------------------------------

def _check_dir(data_dir: str, must_hold_ledger: bool) -> str:
    path = os.path.abspath(data_dir)
    if not os.path.isdir(path):
        raise LedgerError(f"data directory {path} does not exist or is not a directory. Remedy: "
                          f"check --data, or create a node with `yikatong init --demo {path}`")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise LedgerError(f"data directory {path} is not readable and writable by this user. "
                          f"Remedy: fix its permissions (chown/chmod)")
    has = os.path.exists(os.path.join(path, DATA_FILE))
    if must_hold_ledger and not has:
        raise LedgerError(f"{path} holds no ledger ({DATA_FILE} missing); refusing to start an "
                          f"empty one here. Remedy: check --data, or `yikatong init` this directory")
    if not must_hold_ledger and has:
        raise LedgerError(f"{path} already holds a ledger. Remedy: open it, or init another directory")
    return path


class Node:
    """Engine + journal of one node. Not thread-safe: one thread calls apply/append."""

    def __init__(self):
        raise TypeError("use Node.init(...) or Node.open(...)")

    # ---- creating and opening --------------------------------------------------------------
    @classmethod
    def init(cls, data_dir: str, engine_config: NodeConfig, card_capacity: int = 1024,
             txn_retention_count: int = 1 << 20, ledger_config: LedgerConfig | None = None) -> "Node":
        """Create a new, empty ledger in `data_dir` (created if absent; must not hold one)."""
        if not os.path.exists(data_dir):
            parent = os.path.dirname(os.path.abspath(data_dir))
            if not os.path.isdir(parent):
                raise LedgerError(f"parent directory {parent} does not exist. Remedy: create it first")
            os.mkdir(data_dir)
        path = _check_dir(data_dir, must_hold_ledger=False)
        ledger_config = ledger_config or LedgerConfig()
        lock = NodeLock(path)
        try:
            env = open_env(path, ledger_config.map_size_bytes, ledger_config.max_dbs)
            dbs = open_dbs(env, create=True)
            meta = NodeMeta(DATA_LAYOUT_VERSION, RECORD_LAYOUT_VERSION, engine_config, card_capacity,
                            txn_retention_count, ledger_config)
            with env.begin(write=True) as txn:
                if not txn.put(b"node", msgspec.json.encode(meta), db=dbs[DB_META]):
                    raise LedgerError("node metadata put refused")
            env.close()
        except BaseException:
            lock.release()
            raise
        lock.release()
        return cls.open(path)

    @classmethod
    def open(cls, data_dir: str, map_size_bytes: int | None = None,
             lock_wait: bool = False, checkpoint_every_records: int | None = None) -> "Node":
        """Open an existing node and recover its engine: newest valid checkpoint + tail replay."""
        self = object.__new__(cls)
        self.data_dir = path = _check_dir(data_dir, must_hold_ledger=True)
        self._lock = NodeLock(path, wait=lock_wait)
        self._writer = None
        self.env = None
        try:
            self._open(map_size_bytes, checkpoint_every_records)
        except BaseException:
            self._abandon()
            raise
        return self

    def _open(self, map_size_bytes, checkpoint_every_records):
        t0 = time.perf_counter()
        probe = open_env(self.data_dir, map_size_bytes or (1 << 20), 8)
        try:
            dbs = open_dbs(probe, create=False)
            with probe.begin() as txn:
                raw = txn.get(b"node", db=dbs[DB_META])
        finally:
            probe.close()
        if raw is None:
            raise LedgerError(f"{self.data_dir}: node metadata missing. Remedy: restore from backup")
        version = msgspec.json.decode(raw).get("data_layout_version", 0)
        if version > DATA_LAYOUT_VERSION:
            raise LedgerError(f"{self.data_dir} was written with data layout version {version}; this "
                              f"yikatong reads up to version {DATA_LAYOUT_VERSION}. Refusing to open it. "
                              f"Remedy: run the newer yikatong that wrote it")
        meta = msgspec.json.decode(raw, type=NodeMeta)
        if map_size_bytes:
            meta.ledger.map_size_bytes = map_size_bytes
        if checkpoint_every_records:
            meta.ledger.checkpoint_every_records = checkpoint_every_records
        self.meta = meta
        self.env = open_env(self.data_dir, meta.ledger.map_size_bytes, meta.ledger.max_dbs)
        self.dbs = open_dbs(self.env, create=False)
        if map_size_bytes or checkpoint_every_records:     # keep the operator's new values
            with self.env.begin(write=True) as txn:
                txn.put(b"node", msgspec.json.encode(meta), db=self.dbs[DB_META])
        self.engine, self.recovered_from_seq, replayed = recover(self.data_dir, self.env, self.dbs, meta)
        headers = self._headers_tail()
        self.batch_seq = int(headers["batch_seq"]) if headers is not None else 0
        self.last_seq = int(headers["last_seq"]) if headers is not None else 0
        self.business_date = int(headers["business_date"]) if headers is not None else 0
        self.acked_batch_seq = self.batch_seq
        self.records_since_checkpoint = self.last_seq - self.recovered_from_seq
        self.stopped: str | None = None
        self._checkpoint_thread: threading.Thread | None = None
        self._checkpoint_error: BaseException | None = None
        self._pipe_lock = threading.Lock()
        self._start_writer()
        self.acked_batch_seq = self.batch_seq      # the ready handshake acknowledged "batch 0"
        log.info("ledger %s open: %d records in %d batches, recovered from checkpoint at %d + "
                 "%d replayed records in %.3f s", self.data_dir, self.last_seq, self.batch_seq,
                 self.recovered_from_seq, replayed, time.perf_counter() - t0)

    def _headers_tail(self):
        with self.env.begin() as txn:
            cur = txn.cursor(self.dbs[DB_HEADERS])
            if not cur.last():
                return None
            return np.frombuffer(cur.value(), dtype=HEADER_DTYPE)[0]

    def _start_writer(self):
        self._writer = subprocess.Popen(
            [sys.executable, "-m", "yikatong.ledger.writer", self.data_dir,
             str(self.meta.ledger.map_size_bytes), str(self.meta.ledger.max_dbs), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self._lock.fd,), bufsize=0)
        self._fd_out, self._fd_in = self._writer.stdin.fileno(), self._writer.stdout.fileno()
        try:
            import fcntl
            fcntl.fcntl(self._fd_out, 1031, PIPE_SIZE_BYTES)       # F_SETPIPE_SZ
        except OSError:
            pass                                                    # default 64 KiB still works
        self._read_ack(0)

    # ---- the hot path ------------------------------------------------------------------------
    def submit(self, requests: np.ndarray, business_date: int) -> tuple[int, np.ndarray]:
        """Apply a batch in memory and hand its records to the writer; return (ticket, results).
        The results may be answered only after `wait_durable(ticket)` returned."""
        if self.stopped:
            raise LedgerStopped(f"node stopped: {self.stopped}")
        if business_date < self.business_date:
            raise ValueError(f"business_date {business_date} is before the ledger's "
                             f"{self.business_date}: business dates never decrease (日切 only moves forward)")
        if requests.shape[0] == 0:
            return self.batch_seq, requests[:0]
        results = self.engine.apply_batch(requests, business_date=business_date)
        records = records_from_batch(requests, results, self.last_seq + 1, business_date)
        return self._append_records(records, business_date), results

    def _append_records(self, records: np.ndarray, business_date: int) -> int:
        """Hand already-built records (seq from last_seq + 1) to the writer; return the ticket.
        Used by submit, and by the benchmarks to time the journal without the engine."""
        first, count = self.last_seq + 1, records.shape[0]
        assert records.dtype == RECORD_DTYPE and int(records["seq"][0]) == first, "records out of sequence"
        self.batch_seq += 1
        self.last_seq += count
        self.business_date = business_date
        self.records_since_checkpoint += count
        self._send(MSG.pack(KIND_APPEND, business_date, self.batch_seq, first, count), records)
        return self.batch_seq

    def wait_durable(self, ticket: int) -> None:
        """Block until batch `ticket` is committed (fsync'd). Raises LedgerStopped on failure."""
        self._wait_acks(ticket)
        if (self.acked_batch_seq == self.batch_seq
                and self.records_since_checkpoint >= self.meta.ledger.checkpoint_every_records):
            self.checkpoint(wait=False)

    def _wait_acks(self, ticket: int) -> None:
        while self.acked_batch_seq < ticket:
            self._read_ack(self.acked_batch_seq + 1)

    def apply_and_append(self, requests: np.ndarray, business_date: int) -> np.ndarray:
        """Apply and journal one batch; return its results once they are durable."""
        ticket, results = self.submit(requests, business_date)
        self.wait_durable(ticket)
        return results

    def _send(self, head: bytes, payload) -> None:
        try:
            with self._pipe_lock:
                write_all(self._fd_out, head)
                if payload is not None:
                    write_all(self._fd_out, payload.view(np.uint8) if isinstance(payload, np.ndarray) else payload)
        except (BrokenPipeError, OSError):
            self._fail(f"the writer process is gone (exit code {self._writer.poll()})")

    def _read_ack(self, expected: int) -> None:
        try:
            head = read_exact(self._fd_in, ACK.size)
        except (EOFError, OSError):
            head = None
        if head is None:
            self._writer.wait(timeout=10)
            self._fail(f"the writer process exited (code {self._writer.returncode}) before "
                       f"acknowledging batch {expected}")
        bseq, status, length = ACK.unpack(head)
        message = read_exact(self._fd_in, length).decode() if length else ""
        if status:
            self._fail(message)
        assert bseq == expected, (bseq, expected)
        self.acked_batch_seq = bseq

    def _fail(self, why: str):
        self.stopped = why
        log.error("ledger stopped (fail-stop): %s", why)
        raise LedgerStopped(f"node stopped, nothing after batch {self.acked_batch_seq} is "
                            f"acknowledged: {why}")

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, wait: bool = True) -> int:
        """Snapshot the engine's arrays at the last durable sequence. The copy is taken here
        (between batches); the file is written on a background thread, so commits go on."""
        if self.stopped:
            raise LedgerStopped(f"node stopped: {self.stopped}")
        self.wait_durable_all()
        if self._checkpoint_thread is not None:
            if not wait and self._checkpoint_thread.is_alive():
                return -1                                  # one at a time; try after the next batch
            self._checkpoint_thread.join()
        seq, bseq = self.last_seq, self.batch_seq
        if seq == 0:
            return 0
        header = self._headers_tail()
        arrays = {name: a.copy() for name, a in self.engine.arrays.items()}
        self.records_since_checkpoint = 0

        def write():
            try:
                path, digest = ckpt.write_checkpoint(self.data_dir, arrays, seq, bseq, header["digest"].tobytes())
                meta = msgspec.json.encode({"seq": seq, "batch_seq": bseq, "file": os.path.basename(path),
                                            "blake2b": digest})
                if not self.stopped:
                    self._send(MSG.pack(KIND_CKPT_META, len(meta), seq, 0, 0), meta)
                for old_seq, old in ckpt.list_checkpoints(self.data_dir)[self.meta.ledger.checkpoints_kept:]:
                    os.unlink(old)
                log.info("checkpoint at sequence %d written: %s", seq, path)
            except BaseException as e:  # noqa: BLE001 — reported by the next checkpoint/close
                self._checkpoint_error = e
                log.error("checkpoint at sequence %d failed: %s", seq, e)

        self._checkpoint_thread = threading.Thread(target=write, name="checkpoint", daemon=True)
        self._checkpoint_thread.start()
        if wait:
            self._checkpoint_thread.join()
            if self._checkpoint_error:
                raise self._checkpoint_error
        return seq

    def wait_durable_all(self) -> None:
        self._wait_acks(self.batch_seq)

    # ---- reading -----------------------------------------------------------------------------
    def read(self, first: int, last: int) -> np.ndarray:
        """Records first … last (inclusive) as a RECORD_DTYPE array."""
        return read_records(self.env, self.dbs, first, last)

    # ---- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Finish in-flight batches and the checkpoint, stop the writer, release the lock."""
        try:
            if not self.stopped and self._writer is not None:
                self.wait_durable_all()
            if self._checkpoint_thread is not None:
                self._checkpoint_thread.join()
            if self._writer is not None and self._writer.poll() is None:
                try:
                    self._send(MSG.pack(KIND_CLOSE, 0, 0, 0, 0), None)
                except LedgerStopped:
                    pass
        finally:
            self._abandon()

    def _abandon(self):
        if self._writer is not None:
            try:
                self._writer.stdin.close()
            except OSError:
                pass
            try:
                self._writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._writer.kill()
                self._writer.wait()
            self._writer.stdout.close()
            self._writer = None
        if self.env is not None:
            self.env.close()
            self.env = None
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def new_engine(meta: NodeMeta) -> Engine:
    return Engine(meta.engine_config, card_capacity=meta.card_capacity,
                  txn_retention_count=meta.txn_retention_count)


def recover(data_dir: str, env, dbs, meta: NodeMeta) -> tuple[Engine, int, int]:
    """(engine, checkpoint seq, replayed record count): the newest checkpoint that is not newer
    than the journal, checked byte for byte and against the journal's header digest, then every
    later batch replayed with its digest and results checked. Any mismatch raises: a damaged
    file is never silently used or skipped."""
    headers = read_headers(env, dbs)
    check_header_chain(headers)
    last_seq = int(headers["last_seq"][-1]) if headers.size else 0
    engine, from_seq, from_batch = None, 0, 0
    for seq, path in ckpt.list_checkpoints(data_dir):
        head, arrays = ckpt.read_checkpoint(path)             # raises on a bad checksum
        if head.seq != seq or head.seq > last_seq:
            raise LedgerCorrupt(f"checkpoint {path} sequence", seq, f"≤ journal end {last_seq}", head.seq,
                                f"Remedy: move {os.path.basename(path)} out of the checkpoints directory")
        h = headers[head.batch_seq - 1] if 0 < head.batch_seq <= headers.size else None
        if h is None or int(h["last_seq"]) != head.seq or h["digest"].tobytes().hex() != head.header_digest:
            raise LedgerCorrupt(f"checkpoint {path} journal link", seq,
                                "the digest of the journal batch ending here",
                                head.header_digest, f"Remedy: move {os.path.basename(path)} out "
                                f"of the checkpoints directory (it belongs to another ledger)")
        engine = Engine(meta.engine_config, arrays=arrays)
        from_seq, from_batch = head.seq, head.batch_seq
        break
    if engine is None:
        engine = new_engine(meta)
    replayed = 0
    with env.begin(buffers=True) as txn:
        for i in range(from_batch, headers.shape[0]):
            records = batch_records(txn, dbs, headers[i])
            replay_batch(engine, records, int(headers["business_date"][i]))
            replayed += records.shape[0]
    return engine, from_seq, replayed
