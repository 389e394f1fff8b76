"""A node's durable state: the configuration, the engine, the journal and the checkpoints in one
data directory, and start-up recovery (newest valid checkpoint + replay of the tail through the
same apply).

    node = Node.init(DIR, config, genesis)          # a new node, its genesis journaled
    results = node.apply_and_append(requests, business_date=20261124)   # durable on return
    node.close(); node = Node.open(DIR)             # recovered: same arrays, same answers
"""
import functools
import glob
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
import zipfile

from typing import Literal

import msgspec
import numpy as np

from yikatong.engine import ConfigError, Engine
from yikatong.engine.config import NodeConfig
from yikatong.engine.state import saved_arrays

from .journal import CorruptLedgerError, Journal, LedgerError, batch_hash, MAP_SIZE_BYTES_DEFAULT
from .records import (KIND_CAPACITY, KIND_CUTOVER, RECORD_DTYPE, journaled_capacity, marker_record,
                      records_from_batch)

log = logging.getLogger("yikatong.ledger")

# Written (fsynced) by a node whose background chain check found a break; `Node.open` refuses
# to start while it exists (the remedy is in its message).
CHAIN_BROKEN_FILE = "chain-broken.txt"


class NodeSettings(msgspec.Struct, forbid_unknown_fields=True):
    """What a data directory was created with (node.json)."""
    config: NodeConfig
    card_capacity: int
    txn_retention_count: int = 1 << 20
    checkpoint_every_records: int = 1_000_000
    map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT
    # How a background checkpoint gets the arrays (docs/ledger.md, "Checkpoints"): "copy" (a
    # memcpy into pre-faulted buffers between batches — 2–3 ms for the demo node's cards; its
    # transaction ring copied over the batches that follow, its transaction indexes not at all:
    # rebuilt from the ring on load) or "replay" (a replica
    # engine replays the journal: no pause, but its replay competes with the server for the
    # core's caches; on an aged ledger under sustained load it measured worse than the copy,
    # bench/README.md)
    checkpoint_by: Literal["copy", "replay"] = "copy"


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))


class Node:
    def __init__(self, data_dir: str, settings: NodeSettings, journal: Journal, engine: Engine,
                 warm_snapshot: bool = True):
        """`warm_snapshot=False`: the copy's buffers (checkpoint_by "copy") are faulted in later,
        by `_start_snapshot_warm` (recovery starts it once the tail is replayed: its 255 MB of
        page faults would otherwise share the cores with the replay)."""
        self.data_dir = data_dir
        self.settings = settings
        self.journal = journal
        self.engine = engine
        self.checkpoint_seq = 0
        self.failed = None
        self.business_date = journal.last_business_date
        self._checkpoint_thread = None
        self._checkpoint_started_at = 0.0
        # The replica a background checkpoint writes from (checkpoint(background=True)): an
        # Engine of its own that follows the live one by replaying the committed journal, so a
        # checkpoint never copies the live arrays on the serving loop. None until the first
        # background checkpoint seeds it (newest checkpoint file, or genesis); only the
        # checkpoint thread touches it.
        self._replica: Engine | None = None
        self._replica_batch_no = 0
        # the arrays' shapes the replica will have at the next checkpoint, if only the journal
        # changed them: the live engine's now (open sets them again after its replay), and
        # again after each journaled growth (reserve_cards)
        self._replica_shapes = _shapes(engine.arrays)
        self.checkpoint_stats = {"by_replay": 0, "by_copy": 0, "replayed_records": 0, "failed": 0}
        self.checkpoint_error: str | None = None
        self._snapshot_buffers: dict = {}
        self._ring_log = None                  # (entries, positions) for Core.ring_snapshot_begin
        self._snapshot_warm = None
        if warm_snapshot:
            self._start_snapshot_warm()
        # Commits go to the writer process from here on (DESIGN.md §4: not a thread, the GIL).
        journal.start_writer()

    @staticmethod
    def next_day(yyyymmdd: int) -> int:
        import datetime
        d = datetime.date(yyyymmdd // 10000, yyyymmdd // 100 % 100, yyyymmdd % 100) + datetime.timedelta(days=1)
        return d.year * 10000 + d.month * 100 + d.day

    def cutover(self, new_business_date: int | None = None) -> int:
        """日切: journal a cutover record; every command after it lands on the new business date
        (the ledger assigns the date at commit, so each transaction is on exactly one side).
        Returns the new date once the record is durable."""
        new, ticket = self.submit_cutover(new_business_date)
        self.wait_durable(ticket)
        return new

    def submit_cutover(self, new_business_date: int | None = None) -> tuple[int, int]:
        """日切 without waiting (the server, between batches, under load): the cutover record
        goes to the writer after every batch submitted so far and before any later one, so the
        batches before it keep the old date and the ones after it get the new. Returns (new
        date, ticket); like a batch, it is durable once `wait_durable(ticket)` returned, and the
        writer commits in ticket order, so no later reply leaves before it is durable."""
        if self.failed:
            raise LedgerError(f"the node stopped after a failed commit ({self.failed}); restart it")
        new = new_business_date or self.next_day(self.business_date)
        if new <= self.business_date:
            raise LedgerError(f"cutover to {new}: the business date is already {self.business_date}")
        ticket = self._submit_marker(KIND_CUTOVER, new)
        log.info("cutover (日切): business date %d → %d at sequence %d", self.business_date, new, self.journal.last_seq)
        self.business_date = new
        return new, ticket

    # ---- creation and recovery --------------------------------------------------------------
    @classmethod
    def init(cls, data_dir: str, settings: NodeSettings, genesis, business_date: int) -> "Node":
        """Create a node in an empty (or missing) directory and journal its genesis batches."""
        if os.path.isdir(data_dir) and os.listdir(data_dir):
            raise LedgerError(f"{data_dir} is not empty: a new node needs an empty data directory")
        os.makedirs(data_dir, exist_ok=True)
        _write_durably(os.path.join(data_dir, "node.json"), msgspec.json.encode(settings))
        journal = Journal(data_dir, create=True, map_size_bytes=settings.map_size_bytes)
        engine = Engine(settings.config, card_capacity=settings.card_capacity,
                        txn_retention_count=settings.txn_retention_count)
        node = cls(data_dir, settings, journal, engine)
        for batch in genesis:
            results = node.apply_and_append(batch, business_date)
            refused = results["code"] != 0x3030
            if refused.any():
                raise LedgerError(f"genesis: {int(refused.sum())} command(s) refused")
        return node

    @classmethod
    def open(cls, data_dir: str) -> "Node":
        """Recover a node: the newest checkpoint, verified, then the journal's tail replayed
        through the same apply; every replayed result must equal the recorded one."""
        path = os.path.join(os.path.abspath(data_dir), "node.json")
        if not os.path.isdir(data_dir):
            raise LedgerError(f"data directory {data_dir} does not exist: give the node's data directory, "
                              f"or create one with `yikatong init --data DIR`")
        if not os.path.exists(path):
            raise LedgerError(f"{data_dir} holds no node (no node.json): refusing to start an empty node "
                              f"there; create one with `yikatong init --data DIR`")
        try:
            settings = msgspec.json.decode(open(path, "rb").read(), type=NodeSettings)
        except msgspec.ValidationError as e:
            raise LedgerError(f"{path}: {e}") from None
        broken = os.path.join(os.path.abspath(data_dir), CHAIN_BROKEN_FILE)
        if os.path.exists(broken):
            raise CorruptLedgerError(
                f"{data_dir}: a background check found the journal's hash chain broken; the node stopped and "
                f"will not start on this journal ({open(broken).read().strip()}). Remedy: run `yikatong verify "
                f"--data {data_dir}`, restore the journal from a backup or a replica, then remove {broken}")
        journal = Journal(data_dir, map_size_bytes=settings.map_size_bytes)
        try:
            # Only the tail after the newest checkpoint (the batches replayed) is hash-checked
            # before open returns, on worker threads beside the checkpoint load and the replay.
            # The chain before the checkpoint is checked after open, in the background
            # (`_start_prefix_check`): the engine state comes from the checkpoint file (its own
            # BLAKE2b checked here) and the checkpoint records the header hash at its batch, so
            # the tail's check starts from that hash and a checkpoint that disagrees with the
            # headers is refused here (docs/ledger.md "Recovery").
            headers = journal.headers()
            metas = cls._checkpoints(data_dir)
            meta_path = metas[-1] if metas else None
            batch_no, chain_hash = cls._checkpoint_position(meta_path, headers)
            chain = ChainCheck(journal, headers[batch_no:], start_hash=chain_hash)
            chain.start()
            try:
                engine, seq, batch_no, chain_hash = cls._load_checkpoint(data_dir, settings, journal, headers,
                                                                         meta_path=meta_path)
                node = cls(data_dir, settings, journal, engine, warm_snapshot=False)
                node.checkpoint_seq = seq
            except BaseException:
                chain.stop()
                chain.join()
                raise
            node._replay_tail(batch_no, chain_hash, headers, chain)
            # everything the live arrays hold now came from the journal (journaled growth
            # included), so a replica seeded as above and replayed as far reaches these shapes
            node._replica_shapes = _shapes(node.engine.arrays)
            node._start_snapshot_warm()
            node._start_prefix_check(headers[:batch_no])
        except BaseException:
            journal.close()
            raise
        return node

    @staticmethod
    def _checkpoints(data_dir: str) -> list[str]:
        return sorted(glob.glob(os.path.join(data_dir, "checkpoints", "ckpt-*.json")))

    @staticmethod
    def _checkpoint_position(meta_path, headers) -> tuple[int, bytes]:
        """(batch number, header hash at that batch) the checkpoint `meta_path` was taken at,
        (0, zeros) without one; refused when the journal's header there has another hash."""
        if meta_path is None:
            return 0, bytes(32)
        meta = json.load(open(meta_path))
        batch_no = int(meta["batch_no"])
        if batch_no > headers.shape[0] or bytes(headers[batch_no - 1]["hash"]).hex() != meta["chain_hash"]:
            raise CorruptLedgerError(f"checkpoint {meta['file']} is at batch {batch_no} whose journal hash does "
                                     f"not match: it does not belong to this journal")
        return batch_no, bytes.fromhex(meta["chain_hash"])

    @classmethod
    def _load_checkpoint(cls, data_dir, settings, journal, headers, meta_path=None):
        metas = [meta_path] if meta_path is not None else cls._checkpoints(data_dir)
        if not metas:
            engine = Engine(settings.config, card_capacity=settings.card_capacity,
                            txn_retention_count=settings.txn_retention_count)
            return engine, 0, 0, bytes(32)
        meta_path = metas[-1]
        meta = json.load(open(meta_path))
        batch_no, chain_hash = cls._checkpoint_position(meta_path, headers)
        arrays, digest = load_checkpoint_arrays(meta_path)
        _, expected = checkpoint_file_hash(meta)
        if digest != expected:
            raise CorruptLedgerError(f"checkpoint {meta['file']}: content hash {digest[:16]}…, expected "
                                     f"{expected[:16]}… (torn or altered). Remedy: move it (and its "
                                     f".json) out of checkpoints/; the node then recovers from an older one")
        try:
            engine = Engine(settings.config, arrays=arrays)     # rebuilds the transaction indexes
        except ConfigError as e:
            raise CorruptLedgerError(f"checkpoint {meta['file']}: {e}") from None
        return engine, int(meta["seq"]), batch_no, chain_hash

    def _replay_tail(self, after_batch_no: int, checkpoint_hash: bytes, headers: np.ndarray, chain: "ChainCheck"):
        """Check the tail's hash chain and replay the batches after the checkpoint, at once: the
        chain check (BLAKE2b of every batch after the checkpoint, ~0.7 GB/s per core, chained
        from the checkpoint's header hash) runs on worker threads beside the replay (engine
        apply in C, GIL released) on this one. Torn or altered bytes in the tail stop the
        start-up with the first broken batch named, exactly as a check in journal order would
        name it. (The chain before the checkpoint: `_start_prefix_check`, after open.)

        Replay reads each batch where LMDB keeps it (a read transaction, buffers=True) and hands
        it to the engine's replay loop as it lies: no request or result column is copied out of
        the 304-byte records, and the results are compared with the recorded ones in C.
        `chain` (started by `open`) is joined here, whatever happens."""
        errors: list[tuple[int, int, Exception]] = []      # (batch_no, precedence, error)
        if after_batch_no and bytes(headers[after_batch_no - 1]["hash"]) != checkpoint_hash:
            errors.append((after_batch_no, 2, CorruptLedgerError(
                f"the checkpoint at batch {after_batch_no} does not match the journal")))
        try:
            diverged = self._replay_batches(headers[after_batch_no:])
            if diverged is not None:
                errors.append(diverged)
        except BaseException:
            chain.stop()
            raise
        finally:
            errors.extend(chain.join())            # the workers' read transactions end here
        if errors:
            # the error a check in journal order meets first: the lowest batch, then a broken
            # chain before a replay that diverged (altered bytes explain the divergence)
            raise min(errors, key=lambda e: (e[0], e[1]))[2]

    def _start_prefix_check(self, headers: np.ndarray) -> None:
        """The hash chain of the batches up to the checkpoint (`headers`, from batch 1), checked
        in the background once the node is serving: on worker threads at nice +10, so that on a
        busy machine the check yields to the thread answering terminals. Open already checked
        that the checkpoint's recorded header hash is the journal's at its batch; this check
        shows that the batches before it hash, in order, to that header.

        A break found here is fail-stop (docs/ledger.md "Recovery"): the node refuses every
        later batch, acknowledges nothing more (not even batches already committed), takes no
        checkpoint, writes CHAIN_BROKEN_FILE so that it does not start again on this journal
        until an operator has run `yikatong verify`, and logs the broken batch."""
        self._prefix_check = ChainCheck(self.journal, headers, threads=max(1, (os.cpu_count() or 1) - 1),
                                        nice=10)
        self._prefix_check_done = threading.Event()
        self._prefix_check_error = None
        self._prefix_check.start()
        watcher = threading.Thread(target=self._watch_prefix_check, name="chain-check-watch", daemon=True)
        watcher.start()

    def _watch_prefix_check(self):
        try:
            found = self._prefix_check.join()
            if found:                         # a break found before a stop is still a break
                error = min(found, key=lambda e: (e[0], e[1]))[2]
                self._prefix_check_error = error
                self._stop_on_chain_break(error)
        finally:
            self._prefix_check_done.set()

    def _stop_on_chain_break(self, error: Exception):
        reason = f"the journal's hash chain is broken before the checkpoint ({error})"
        self.failed = reason
        self.journal.failed = reason          # refuses submits; acknowledges nothing more
        log.critical("%s: the node stops (fail-stop); run `yikatong verify --data %s`", reason, self.data_dir)
        try:
            _write_durably(os.path.join(self.data_dir, CHAIN_BROKEN_FILE), (reason + "\n").encode())
        except OSError as e:                  # the node is stopped either way; only the marker is lost
            log.error("could not write %s: %s", CHAIN_BROKEN_FILE, e)

    def wait_chain_check(self, timeout_s: float | None = None) -> Exception | None:
        """Wait for the background check of the chain before the checkpoint (started by
        `open`); returns the break it found (the node has then stopped) or None. Returns
        None at once for a node that was not opened from a journal (`init`)."""
        done = getattr(self, "_prefix_check_done", None)
        if done is None:
            return None
        if not done.wait(timeout_s):
            raise TimeoutError(f"the background chain check is still running after {timeout_s} s")
        return self._prefix_check_error

    def _replay_batches(self, headers: np.ndarray, engine: Engine | None = None):
        """Replay `headers`' batches in order into `engine` (the node's own by default); None, or
        (batch_no, 3, error) at the first batch that answers differently from the journal."""
        if headers.shape[0] == 0:
            return None
        size = RECORD_DTYPE.itemsize
        request_offset, result_offset = RECORD_DTYPE.fields["request"][1], RECORD_DTYPE.fields["result"][1]
        kind_offset = RECORD_DTYPE.fields["record_kind"][1]
        journal = self.journal
        engine = self.engine if engine is None else engine
        with journal.env.begin(buffers=True) as txn:
            get = txn.get
            db = journal.journal_db
            for batch_no, first, count, date in zip(headers["batch_no"].tolist(), headers["first_seq"].tolist(),
                                                   headers["record_count"].tolist(),
                                                   headers["business_date"].tolist()):
                value = get(first.to_bytes(8, "big"), db=db)
                if value is None or len(value) != count * size:
                    return None                    # missing or torn: the chain check names it
                rows = np.frombuffer(value, np.uint8)
                if rows.ctypes.data % 8:
                    rows = rows.copy()             # LMDB keeps small values 2-byte aligned only
                kinds = np.ndarray(count, "<u2", rows, kind_offset, (size,))
                if (kinds == KIND_CUTOVER).all():
                    continue                       # a cutover changes no engine state
                if (kinds == KIND_CAPACITY).all():
                    engine.reserve(journaled_capacity(np.frombuffer(rows, RECORD_DTYPE)), exact=True)
                    continue
                bad = engine.replay_rows(rows, size, request_offset, result_offset, business_date=date)
                if bad >= 0:
                    return batch_no, 3, CorruptLedgerError(
                        f"replay diverged at sequence {first + bad}: the engine answered differently from "
                        f"the journal (engine or configuration changed?)")
        return None

    def _submit_marker(self, kind: int, business_date: int, capacity: int = 0) -> int:
        """One record that is not a command (a cutover, a capacity change: `marker_record`) to
        the writer, after every batch submitted so far; its ticket. A failed submit stops the
        node (fail-stop), as for a batch."""
        try:
            return self.journal.submit(marker_record(self.journal.last_seq + 1, kind, business_date, capacity),
                                       business_date)
        except Exception as e:
            self.failed = str(e)
            raise

    def reserve_cards(self, card_count: int) -> None:
        """Room for `card_count` cards (Engine.reserve), journaled: a KIND_CAPACITY record with
        the new capacity is committed before any batch that may use the room, so recovery,
        `verify` and the checkpoint replica grow the card columns at the same point in the
        sequence as the live engine (DESIGN.md §6.8). Without it a node that grew for a card
        import could not restart before its next checkpoint: the replayed issuances answered 96
        (no room) where the journal says 00. Returns once the record is durable."""
        if card_count <= self.engine.card_capacity:
            return
        if self.failed:
            raise LedgerError(f"the node stopped after a failed commit ({self.failed}); restart it")
        self.engine.reserve(card_count)
        ticket = self._submit_marker(KIND_CAPACITY, self.business_date, capacity=self.engine.card_capacity)
        if self._replica_shapes is not None:
            # the replica grows when it replays this record: no copy needed for it
            self._replica_shapes = _shapes(self.engine.arrays)
        log.info("card capacity grown to %d cards at sequence %d", self.engine.card_capacity, self.journal.last_seq)
        self.wait_durable(ticket)

    # ---- the write path -----------------------------------------------------------------------
    def submit(self, requests: np.ndarray, business_date: int | None = None,
               results: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        """Apply a batch in memory and hand its records to the writer process; return
        (ticket, results). The results may leave only after `wait_durable(ticket)` returned —
        meanwhile the caller may apply the next batch (pipelining, DESIGN.md §5). `results`: a
        RESULT_DTYPE buffer to answer into (the journal's records are built from it before this
        returns, so the caller may reuse it for its next batch once it has read the answers)."""
        if self.failed:
            raise LedgerError(f"the node stopped after a failed commit ({self.failed}); restart it")
        business_date = business_date or self.business_date
        if business_date < self.business_date:
            raise LedgerError(f"business date {business_date} is before the node's {self.business_date} "
                              f"(after a cutover, 日切, the old date is closed)")
        self.business_date = business_date
        results = self.engine.apply_batch(requests, results, business_date=business_date)
        # built where the writer process reads them (its shared ring), when there is room
        records = records_from_batch(requests, results, self.journal.last_seq + 1, business_date,
                                     out=self.journal.ring_records(requests.shape[0]))
        try:
            return self.journal.submit(records, business_date), results
        except Exception as e:
            self.failed = str(e)
            raise

    def wait_durable(self, ticket: int) -> None:
        """Return once batch `ticket` is committed; a failed commit stops the node (fail-stop)."""
        try:
            self.journal.wait_durable(ticket)
        except Exception as e:
            self.failed = str(e)
            raise
        if (ticket == self.journal.last_batch_no
                and self.journal.last_seq - self.checkpoint_seq >= self.settings.checkpoint_every_records):
            self.checkpoint(background=True)

    def apply_and_append(self, requests: np.ndarray, business_date: int | None = None) -> np.ndarray:
        """Apply a batch and journal it under the node's business date (or a later one given);
        returns the results once they are durable. A failed commit stops the node (fail-stop):
        restart it to recover from the journal."""
        ticket, results = self.submit(requests, business_date)
        self.wait_durable(ticket)
        return results

    def checkpoint(self, background: bool = False) -> str:
        """Save the engine's arrays at the last committed sequence: write, fsync, rename.
        Returns the .npz path.

        In the foreground the live arrays are written as they are (the caller waits). In the
        background (`background=True`, the server's way) the file is written by a SCHED_IDLE
        thread while batches go on, from arrays made as `settings.checkpoint_by` says:
        - "copy" (the default): the live arrays copied here, between batches, into buffers
          pre-faulted at start-up (2–3 ms for the demo node), the transaction ring excepted:
          its copy is begun here and made by the batches that follow and the thread (_snapshot);
          the transaction indexes are not in a checkpoint (rebuilt from the ring on load);
        - "replay": nothing of the live engine is copied; the thread brings the node's replica
          engine up to this sequence by replaying the committed journal through the same apply
          (every replayed result compared with the journal's, as recovery does) and writes the
          replica's arrays. Only when the live arrays changed shape outside the journal
          (`Engine.reserve` called directly, not `reserve_cards`) is the replica re-seeded by a
          copy here. No pause, but the replay's memory traffic competes with the server's: on
          an aged ledger under sustained load it measured worse than the copy (bench/README.md).

        A checkpoint due while the previous one is still being written waits for it here
        (checkpoint positions stay deterministic); the server never calls it then
        (`checkpoint_in_progress`)."""
        if self.failed:
            raise LedgerError(f"the node stopped ({self.failed}); no checkpoint is taken: restart it")
        self.journal.wait_durable(self.journal.last_batch_no)
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join()
        seq, batch_no, chain_hash = self.journal.last_seq, self.journal.last_batch_no, self.journal.last_hash
        self.checkpoint_seq = seq
        folder = os.path.join(self.data_dir, "checkpoints")
        npz = os.path.join(folder, f"ckpt-{seq:020d}.npz")
        if not background:
            return _write_checkpoint(folder, self.engine.arrays, seq, batch_no, chain_hash)
        if self.settings.checkpoint_by == "copy":
            t0 = time.perf_counter()
            arrays = self._snapshot()
            copy_ms = (time.perf_counter() - t0) * 1e3         # the pause on the caller's thread
            take = functools.partial(self._copied, arrays, copy_ms, seq)
        else:
            seed = None
            if self._replica_shapes != _shapes(self.engine.arrays):
                # the live arrays grew outside the journal (Engine.reserve, not reserve_cards): a
                # replay cannot know when, so the replica starts again from a copy of the live state
                seed = {name: _copy_of(array) for name, array in self.engine.arrays.items()}
                self._replica = None
                self._replica_shapes = _shapes(seed)
            take = functools.partial(self._replica_at, batch_no, seed)
        self._checkpoint_thread = threading.Thread(target=self._background_checkpoint, name="checkpoint", daemon=True,
                                                   args=(folder, seq, batch_no, chain_hash, take))
        self._checkpoint_started_at = time.monotonic()
        self._checkpoint_thread.start()
        return npz

    def checkpoint_in_progress(self) -> bool:
        """A background checkpoint is still being written."""
        return self._checkpoint_thread is not None and self._checkpoint_thread.is_alive()

    def nudge_checkpoint(self) -> bool:
        """Called now and then by the server (its 1 s sweep): a background checkpoint that has
        waited for idle time longer than CHECKPOINT_IDLE_WAIT_S — a core saturated for that
        long — goes on at nice +10 instead of SCHED_IDLE, so a node under sustained full load
        still checkpoints (and its recovery tail stays bounded). True when it escalated."""
        thread = self._checkpoint_thread
        if (thread is None or not thread.is_alive() or thread.native_id is None
                or time.monotonic() - self._checkpoint_started_at < CHECKPOINT_IDLE_WAIT_S):
            return False
        if not _run_niced(thread.native_id):
            return False
        log.warning("checkpoint waited %.0f s for idle time on a saturated core: it goes on at nice +10",
                    time.monotonic() - self._checkpoint_started_at)
        self._checkpoint_started_at = float("inf")          # once per checkpoint
        return True

    def _snapshot(self) -> dict:
        """The engine's arrays copied into buffers kept from one checkpoint to the next (free
        again: one checkpoint at a time). This copy is the one part of a "copy" checkpoint on
        the reply path; into fresh memory it page-faults every 4 KiB and measured ≈ 3× a plain
        memcpy (≈ 0.4 s for 255 MB on an aged node), so the buffers are faulted in once, at
        start-up, by a thread.

        The transaction ring (168 MB of the demo node's 247) is not copied here: its copy is
        begun (Core.ring_snapshot_begin) and spread over the next batches, each copying the
        entries it may overwrite before it runs, and the checkpoint thread copying the rest
        (`_copied`). The transaction indexes are not copied at all: a checkpoint does not hold
        them (state.DERIVED_ARRAYS, rebuilt from the ring on load). The pause is the cards, their
        indexes and the small arrays."""
        if self._snapshot_warm is not None:
            self._snapshot_warm.join()
        buffers = self._snapshot_buffers
        saved = saved_arrays(self.engine.arrays)
        for name, array in saved.items():
            buffer = buffers.get(name)
            if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
                buffer = buffers[name] = np.empty_like(array)      # the engine grew this array
            if name != "txns":
                raw_copy(buffer, array)
        for name in set(buffers) - set(saved):
            del buffers[name]
        if self._ring_log is None:
            self._ring_log = (np.zeros(RING_SNAPSHOT_LOG_ENTRIES, dtype=self.engine.arrays["txns"].dtype),
                              np.zeros(RING_SNAPSHOT_LOG_ENTRIES, dtype=np.int32))
        self.engine.core.ring_snapshot_begin(buffers["txns"], *self._ring_log)
        return dict(buffers)

    def _start_snapshot_warm(self):
        if self.settings.checkpoint_by != "copy":
            return
        self._snapshot_warm = threading.Thread(target=self._warm_snapshot, args=(dict(self.engine.arrays),),
                                               name="checkpoint-buffers", daemon=True)
        self._snapshot_warm.start()

    def _warm_snapshot(self, arrays: dict):
        # a benign race: this reads arrays the engine may be writing; only the pages matter here
        for name, array in saved_arrays(arrays).items():
            buffer = np.empty_like(array)
            raw_copy(buffer, array)            # touches every page (numpy releases the GIL)
            self._snapshot_buffers[name] = buffer

    def _background_checkpoint(self, folder: str, seq: int, batch_no: int, chain_hash: bytes,
                               take) -> None:
        """The checkpoint thread (SCHED_IDLE): `take()` gives (arrays, how the log line says they
        were made) — the copy made between batches, or the replica brought to `batch_no` —
        then the arrays go to the file. A failure (a replica that answers differently from the
        journal: an engine or configuration change recovery would refuse too; the disk) writes
        no checkpoint; the error is logged and kept in `checkpoint_error`, and in replay mode the
        next checkpoint seeds a new replica from a copy of the live arrays."""
        _run_when_idle()
        try:
            arrays, how = take()
            _write_checkpoint(folder, arrays, seq, batch_no, chain_hash, how)
            self.checkpoint_error = None
        except Exception as e:
            if self.engine.core.ring_snapshot_active:
                self.engine.core.ring_snapshot_end()     # so the next checkpoint can begin one
            self._replica = None
            self._replica_shapes = None            # replay mode: the next checkpoint seeds by a copy
            self.checkpoint_stats["failed"] += 1
            self.checkpoint_error = f"checkpoint at sequence {seq} not written: {e}"
            log.error("%s. The node goes on serving (the journal holds everything); the next checkpoint "
                      "starts again. Remedy if it repeats: check the data directory's disk and run "
                      "`yikatong verify --data %s`", self.checkpoint_error, self.data_dir)

    def _copied(self, arrays: dict, copy_ms: float, seq: int) -> tuple[dict, str]:
        """The checkpoint thread's part of a copy: the rest of the ring, a step at a time (each
        step holds batches off for ~0.1 ms), then the bytes of entries changed in place before
        the copy reached them put back."""
        t0 = time.perf_counter()
        core = self.engine.core
        while not core.ring_snapshot_copy(RING_SNAPSHOT_STEP_ENTRIES):
            pass
        logged, exact = core.ring_snapshot_end()
        if not exact:
            raise LedgerError(f"more than {RING_SNAPSHOT_LOG_ENTRIES:,} older transaction entries changed in place "
                              f"while the checkpoint at sequence {seq} copied the ring; it is not exact")
        self.checkpoint_stats["by_copy"] += 1
        return arrays, (f"copied between batches in {copy_ms:.1f} ms, the ring over the next batches in "
                        f"{time.perf_counter() - t0:.2f} s ({logged} entries changed in place meanwhile)")

    def _replica_at(self, batch_no: int, seed: dict | None) -> tuple[dict, str]:
        """The replica's arrays at `batch_no`: re-seeded from `seed` (a copy of the live arrays),
        or the committed batches since its last checkpoint replayed into it."""
        t0 = time.perf_counter()
        if seed is not None:
            self._replica, self._replica_batch_no = Engine(self.settings.config, arrays=seed), batch_no
            self.checkpoint_stats["by_copy"] += 1
            return self._replica.arrays, "the replica re-seeded from a copy of the live arrays"
        replayed = self._advance_replica(batch_no)
        self.checkpoint_stats["by_replay"] += 1
        return self._replica.arrays, f"{replayed:,} records replayed into the replica in {time.perf_counter() - t0:.2f} s"

    def _advance_replica(self, batch_no: int) -> int:
        """Replay the committed batches after the replica's up to `batch_no` into it; the replica
        is seeded first, when there is none, as `open` seeds the live engine (newest checkpoint
        file, its hash checked, or the empty engine of genesis: the first checkpoint after a
        start replays what the node served since, genesis included on a new node)."""
        if self._replica is None:
            headers = self.journal.headers(last_batch_no=batch_no)
            self._replica, _, self._replica_batch_no, _ = self._load_checkpoint(
                self.data_dir, self.settings, self.journal, headers)
            todo = headers[self._replica_batch_no:batch_no]
        else:                                      # only the batches since the last checkpoint
            todo = self.journal.headers(self._replica_batch_no + 1, batch_no)
        diverged = self._replay_batches(todo, engine=self._replica)
        if diverged is not None:
            raise diverged[2]
        self._replica_batch_no = batch_no
        replayed = int(todo["record_count"].sum())
        self.checkpoint_stats["replayed_records"] += replayed
        return replayed

    def close(self):
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join()
        check = getattr(self, "_prefix_check", None)
        if check is not None:
            # an unfinished background check is abandoned (the next open starts it again);
            # its read transactions must end before the environment closes
            check.stop()
            self._prefix_check_done.wait()
        self.journal.close()


# A copy checkpoint's ring copy (Node._snapshot, Node._copied): entries per step of the checkpoint
# thread (8,192 × 160 B = 1.3 MB, ~0.15 ms with batches held off), and the older entries that may
# change in place (void, refund, cancel, reversal) before the copy reaches them: 65,536 (10 MB);
# more, and that checkpoint fails and the next one is taken as usual.
RING_SNAPSHOT_STEP_ENTRIES = 8192
RING_SNAPSHOT_LOG_ENTRIES = 65536

# How long a background checkpoint waits for idle time (SCHED_IDLE) before Node.nudge_checkpoint
# lets it run at nice +10: a saturated core delays checkpoints, but not without bound.
CHECKPOINT_IDLE_WAIT_S = 10.0


def _run_niced(native_id: int) -> bool:
    """Thread `native_id` back to the normal policy at nice +10 (Linux); False when not possible."""
    try:
        os.sched_setscheduler(native_id, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, native_id, 10)
        return True
    except (AttributeError, OSError):
        return False


def _run_when_idle() -> None:
    """This thread runs only when its core has nothing else to run (Linux SCHED_IDLE), else at
    nice +10. A checkpoint costs ≈ 1 s of CPU per million records (the replica's replay, the
    file's CRC-32 and SHA-256): at nice +10 it still took ~10 % of a server core that is ~85 %
    busy at 150,000 messages/s, and 5–25 % of the replies in the 4 s it ran were over 10 ms;
    as SCHED_IDLE it waits for the core's idle moments (bench/README.md, "Checkpoints by
    replay"). A saturated core delays the checkpoint, never a reply; the server starts the
    next one only when this one is written."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))     # 0: this thread
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass                                       # not Linux, or not permitted: same priority


def _shapes(arrays: dict) -> dict:
    """Each array's (shape, dtype): what must match for a replayed replica to equal the engine."""
    return {name: (array.shape, array.dtype) for name, array in arrays.items()}


def _write_checkpoint(folder: str, arrays: dict, seq: int, batch_no: int, chain_hash: bytes,
                      how: str = "") -> str:
    """The checkpoint file and, last, its .json (a checkpoint without it is ignored). `how`:
    what the log line says made the arrays (the replica's replay, a copy). The derived arrays
    (state.DERIVED_ARRAYS: the transaction indexes) are left out; loading rebuilds them."""
    t0 = time.perf_counter()
    arrays = saved_arrays(arrays)
    os.makedirs(folder, exist_ok=True)
    name = f"ckpt-{seq:020d}"
    npz = os.path.join(folder, name + ".npz")
    f = CheckpointFile(npz + ".tmp")
    try:
        save_npz(f, arrays)
        digest = f.close()
    finally:
        f.abandon()
    os.rename(npz + ".tmp", npz)
    meta = {"file": name + ".npz", "seq": seq, "batch_no": batch_no,
            "chain_hash": chain_hash.hex(), "file_" + CHECKPOINT_FILE_HASH: digest}
    _write_durably(os.path.join(folder, name + ".json"), json.dumps(meta).encode())
    log.info("checkpoint at sequence %d (batch %d): %s (%swritten in %.2f s)", seq, batch_no, npz,
             how + ", " if how else "", time.perf_counter() - t0)
    return npz


class CheckpointFile:
    """A checkpoint file written for zipfile (write, tell; not seekable, so zipfile streams its
    members with data descriptors) straight to the disk with O_DIRECT, from one page-aligned
    NPZ_PIECE_BYTES buffer, hashing (CHECKPOINT_FILE_HASH) the bytes on the way: `close`
    returns the file's digest, so the file is not read back to hash it.

    Why not the page cache: on ext4 (data=ordered) the journal's commit fsyncs wait for other
    files' dirty pages, so a checkpoint written through the cache slowed the commits beside it
    (bench/README.md, "Checkpoints by replay"); each O_DIRECT write is on the disk when it
    returns and leaves nothing dirty behind. Measured at 150,000 messages/s with two checkpoints
    in 3 M messages: p99 under 10 ms in 7 of 8 runs (median 9.3 ms) against 4 of 8 through the
    cache. Where O_DIRECT is refused (tmpfs, other systems) it writes through the cache and
    fdatasyncs every piece (the earlier pacing)."""

    def __init__(self, path: str, piece_bytes: int | None = None, direct: bool = True):
        """`direct=False`: through the page cache (the fallback, chosen; for tests)."""
        direct = getattr(os, "O_DIRECT", 0) if direct else 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd = -1
        if direct:
            try:
                self.fd = os.open(path, flags | direct, 0o644)
            except OSError:
                direct = 0
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.direct = bool(direct)
        self._buffer = mmap.mmap(-1, piece_bytes or NPZ_PIECE_BYTES)   # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buffer)
        self._array = np.frombuffer(self._buffer, np.uint8)   # copies into it release the GIL
        self._fill = 0
        self._position = 0
        self._hash = hashlib.new(CHECKPOINT_FILE_HASH)

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._hash.update(data)                            # hashlib releases the GIL too
        source = np.frombuffer(data, np.uint8)
        at, size = 0, len(data)
        while at < size:
            take = min(size - at, len(self._view) - self._fill)
            self._array[self._fill:self._fill + take] = source[at:at + take]
            self._fill += take
            at += take
            if self._fill == len(self._view):
                self._write_out(len(self._view))
        self._position += size
        return size

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def _write_out(self, size: int) -> None:
        done = 0
        while done < size:
            done += os.write(self.fd, self._view[done:size])
        if not self.direct:
            os.fdatasync(self.fd)
        self._fill = 0

    def close(self) -> str:
        """Write the rest, cut the file to its length, fdatasync; the file's hex digest."""
        if self._fill:
            # O_DIRECT writes whole blocks: the last piece padded with zeros, then cut off
            size = -(-self._fill // 4096) * 4096 if self.direct else self._fill
            self._view[self._fill:size] = bytes(size - self._fill)
            self._write_out(size)
        os.ftruncate(self.fd, self._position)
        os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return self._hash.hexdigest()

    def abandon(self) -> None:
        """Close without finishing (after an error); a no-op once closed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._array = None
        self._view.release()
        self._buffer.close()


def _copy_of(array: np.ndarray) -> np.ndarray:
    copy = np.empty_like(array)
    raw_copy(copy, array)
    return copy


def raw_copy(destination: np.ndarray, source: np.ndarray) -> None:
    """A memcpy of one C-contiguous array into another of the same dtype and shape. Through byte
    views: numpy copies a structured dtype (the txn ring, the cards) field by field, measured
    8–10× slower than the bytes (168 MB: 155–190 ms vs 19 ms)."""
    assert destination.dtype == source.dtype and destination.shape == source.shape
    assert destination.flags.c_contiguous and source.flags.c_contiguous
    np.copyto(destination.reshape(-1).view(np.uint8), source.reshape(-1).view(np.uint8))


# The checkpoint file's pieces (CheckpointFile's O_DIRECT writes; save_npz's when paced). Through the
# page cache, pieces of 1 MiB, each fdatasync'd: with 8 MiB pieces a 255 MB checkpoint during an
# open-loop run at 150,000/s put 5–9 % of the replies of the next ~1.5 s over 10 ms (the
# journal's commits waiting behind the piece's writeback; p99 of a 1.5 M-message run 20–23 ms);
# with 1 MiB, 10.7–12.7 ms, the copy's stall left as the main cost; with 256 KiB the checkpoint's
# 1,000 fdatasyncs spread the disturbance over the rest of the run (p99 18–20 ms). bench/README.md.
NPZ_PIECE_BYTES = 1 << 20


def save_npz(f, arrays: dict, pace: bool = False) -> None:
    """np.savez's format (an uncompressed zip of .npy members; np.load reads it) written from the
    arrays' own memory in NPZ_PIECE_BYTES pieces. np.savez copies every 16 MiB piece with tobytes() while
    holding the GIL, which the node's main thread (the apply loop) then waits for; here the GIL
    is released for each piece's CRC and write, and nothing is copied.

    `pace`: fdatasync `f` after every piece. On ext4 (data=ordered) a journal commit's fsync
    also waits for the checkpoint's dirty pages: one fsync of a 255 MB checkpoint held journal
    commits 119–138 ms (measured, 2 runs of 3); paced, the worst commit beside it was 5–9 ms."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                raw = memoryview(array.reshape(-1).view(np.uint8))
                for at in range(0, len(raw), NPZ_PIECE_BYTES):
                    member.write(raw[at:at + NPZ_PIECE_BYTES])
                    if pace:
                        f.flush()
                        os.fdatasync(f.fileno())


# The checkpoint file's own hash, recorded in its .json as "file_<algorithm>" and checked before
# a byte of it is used. SHA-256, not BLAKE2b: this CPU has SHA-NI, and OpenSSL's SHA-256 runs
# 2.5× hashlib's BLAKE2b here (0.74 vs 0.29 GB/s measured side by side on the shared cores), and
# this hash is on recovery's critical path (255 MB before the replay can start). Checkpoints
# written before carry "file_blake2b" and are checked with it. (The journal's hash chain stays
# BLAKE2b: its bytes are in the ledger's format.)
CHECKPOINT_FILE_HASH = "sha256"


def checkpoint_file_hash(meta: dict) -> tuple[str, str]:
    """(algorithm, expected hex digest) of a checkpoint's .json."""
    for algorithm in ("sha256", "blake2b"):
        if "file_" + algorithm in meta:
            return algorithm, meta["file_" + algorithm]
    raise CorruptLedgerError(f"checkpoint {meta.get('file')}: its .json records no file hash (file_sha256 or "
                             f"file_blake2b). Remedy: move it out of checkpoints/; the node then recovers from "
                             f"an older one")


def file_digest(path: str, algorithm: str) -> str:
    """Hex digest of a file: "sha256", or "blake2b" (BLAKE2b-256, as checkpoints before SHA-256)."""
    with open(path, "rb") as f:
        if algorithm == "blake2b":
            return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).hexdigest()
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_blake2b(path: str) -> str:
    return file_digest(path, "blake2b")


def load_npz(path: str) -> dict:
    """The arrays of an uncompressed .npz (np.savez's format, which save_npz writes), each read
    from the file straight into a fresh array as raw bytes: one readinto per member.

    np.load reads a member in 256 KiB pieces through zipfile (a CRC-32 of each piece in Python's
    zip code) and assigns every piece into a structured array field by field: 0.55–0.93 s for a
    255 MB checkpoint on this machine, against ≈ 0.1 s here (bench/README-ledger.md §1). The file's
    integrity is the caller's (the checkpoint's BLAKE2b); a member that is compressed, object,
    Fortran-ordered or of an unknown .npy version is left to np.load.

    >>> arrays = load_npz("checkpoints/ckpt-00000000000001000000.npz")   # doctest: +SKIP
    """
    arrays = {}
    fallback = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type != zipfile.ZIP_STORED:
                fallback.append(name)
                continue
            f.seek(info.header_offset)
            local = f.read(30)                             # the member's local file header
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: member {info.filename}: no local header at byte {info.header_offset}")
            name_bytes, extra_bytes = struct.unpack("<HH", local[26:30])
            member_start = info.header_offset + 30 + name_bytes + extra_bytes
            f.seek(member_start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                fallback.append(name)
                continue
            if fortran_order or dtype.hasobject:
                fallback.append(name)
                continue
            array = np.empty(shape, dtype=dtype)
            data_bytes = info.file_size - (f.tell() - member_start)
            if data_bytes != array.nbytes:
                raise ValueError(f"{path}: member {info.filename}: {data_bytes} bytes of data, expected "
                                 f"{array.nbytes} for {dtype} {shape}")
            if array.nbytes:
                got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
                if got != array.nbytes:
                    raise ValueError(f"{path}: member {info.filename}: {got} bytes read, expected {array.nbytes} "
                                     f"(truncated)")
            arrays[name] = array
    if fallback:
        with np.load(path) as data:
            arrays.update({name: data[name] for name in fallback})
    return arrays


def load_checkpoint_arrays(meta_path: str) -> tuple[dict, str]:
    """The checkpoint's arrays and the file's digest (`checkpoint_file_hash`); ({}, digest) when
    the digest is not the recorded one. The file is hashed on a thread while numpy parses it (both read the same
    pages; hashlib releases the GIL), and nothing parsed is returned unless the hash matched."""
    meta = json.load(open(meta_path))
    npz = os.path.join(os.path.dirname(meta_path), meta["file"])
    algorithm, expected = checkpoint_file_hash(meta)
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(file_digest(npz, algorithm)), name="checkpoint-hash",
                              daemon=True)
    hasher.start()
    try:
        # each member read into a fresh writable array (load_npz): no copy needed. A torn file
        # may fail to parse: then the hash names the fault.
        arrays = load_npz(npz)
    except Exception:
        hasher.join()
        if digest and digest[0] != expected:
            return {}, digest[0]
        raise
    hasher.join()
    if not digest:
        raise LedgerError(f"checkpoint {meta['file']}: could not be read to hash it")
    if digest[0] != expected:
        return {}, digest[0]
    return arrays, digest[0]


class ChainCheck:
    """The hash chain of every batch checked on worker threads (hashlib releases the GIL while it
    hashes), each over a contiguous share of the batches in its own read transaction; `join`
    returns the first broken point of each share as (batch_no, precedence, CorruptLedgerError)."""

    def __init__(self, journal: Journal, headers: np.ndarray, threads: int | None = None,
                 start_hash: bytes = bytes(32), nice: int = 0):
        """`headers`: consecutive batches; the first chains from `start_hash` (zeros at genesis,
        the checkpoint's recorded header hash for a tail). `nice`: the workers' CPU priority
        (Linux, per thread; 0 = unchanged)."""
        self.journal = journal
        self.headers = headers
        self.start_hash = start_hash
        self.nice = nice
        self.threads = max(1, min(threads or os.cpu_count() or 1, 8, headers.shape[0] or 1))
        self._found: list = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self):
        # equal shares of bytes, not of batches: batches range from 1 to thousands of records
        count = self.headers.shape[0]
        if count == 0:
            return
        weight = np.cumsum(self.headers["record_count"].astype(np.int64) + 64)
        bounds = [0] + [int(np.searchsorted(weight, weight[-1] * k // self.threads, side="right"))
                        for k in range(1, self.threads)] + [count]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                t = threading.Thread(target=self._check, args=(lo, hi), name="chain-check", daemon=True)
                t.start()
                self._workers.append(t)

    def join(self) -> list:
        """Wait for every worker; their read transactions are closed when this returns."""
        for t in self._workers:
            t.join()
        return self._found

    def stop(self):
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _check(self, lo: int, hi: int):
        headers = self.headers[lo:hi]
        size = RECORD_DTYPE.itemsize
        prev_hashes = headers["prev_hash"].tobytes()
        hashes = headers["hash"].tobytes()
        # the link to the share before: the previous header's hash (or zeros at genesis)
        before = bytes(self.headers[lo - 1]["hash"]) if lo else self.start_hash
        journal = self.journal
        chain = journal.chain
        batch_no = int(headers["batch_no"][0])
        if self.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except (AttributeError, OSError):
                pass                           # not Linux, or not permitted: same priority
        try:
            with journal.env.begin(buffers=True) as txn:
                get, db = txn.get, journal.journal_db
                for k, (batch_no, first, last, count) in enumerate(zip(
                        headers["batch_no"].tolist(), headers["first_seq"].tolist(),
                        headers["last_seq"].tolist(), headers["record_count"].tolist())):
                    if self._stop.is_set():
                        return
                    prev = prev_hashes[32 * k:32 * k + 32]
                    expected = hashes[32 * k:32 * k + 32]
                    if prev != before:
                        raise CorruptLedgerError(f"batch {batch_no}: previous hash {prev.hex()[:16]}…, expected "
                                                 f"{before.hex()[:16]}… (hash chain broken)")
                    value = get(first.to_bytes(8, "big"), db=db)
                    if value is None:
                        raise CorruptLedgerError(f"batch {batch_no}: no journal value at sequence {first}")
                    if len(value) != count * size:
                        raise CorruptLedgerError(f"batch {batch_no}: {len(value)} bytes of records, expected "
                                                 f"{count * size} (torn)")
                    found = batch_hash(prev, value, chain)
                    if found != expected:
                        raise CorruptLedgerError(
                            f"batch {batch_no} (sequence {first}…{last}): records hash {found.hex()[:16]}…, "
                            f"header says {expected.hex()[:16]}… (records altered)")
                    before = expected
        except CorruptLedgerError as e:
            self._found.append((batch_no, 1, e))      # list.append is atomic under the GIL
        except BaseException as e:  # noqa: BLE001 — reported, never lost on a daemon thread
            self._found.append((batch_no, 0, e))


def check_batch(header, payload: bytes, prev_hash: bytes, chain: bytes):
    """The batch's bytes hash to its header (`chain`: the ledger's Journal.chain), and the header
    chains to the previous one."""
    batch_no = int(header["batch_no"])
    if bytes(header["prev_hash"]) != prev_hash:
        raise CorruptLedgerError(f"batch {batch_no}: previous hash {bytes(header['prev_hash']).hex()[:16]}…, "
                                 f"expected {prev_hash.hex()[:16]}… (hash chain broken)")
    if len(payload) != int(header["record_count"]) * RECORD_DTYPE.itemsize:
        raise CorruptLedgerError(f"batch {batch_no}: {len(payload)} bytes of records, expected "
                                 f"{int(header['record_count']) * RECORD_DTYPE.itemsize} (torn)")
    found = batch_hash(prev_hash, payload, chain)
    if found != bytes(header["hash"]):
        raise CorruptLedgerError(f"batch {batch_no} (sequence {int(header['first_seq'])}…{int(header['last_seq'])}): "
                                 f"records hash {found.hex()[:16]}…, header says {bytes(header['hash']).hex()[:16]}… "
                                 f"(records altered)")
