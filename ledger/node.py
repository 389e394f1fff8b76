"""A node's durable state: the configuration, the engine, the journal and the checkpoints in one
data directory, and start-up recovery (newest valid checkpoint + replay of the tail through the
same apply).

    node = Node.init(DIR, config, genesis)          # a new node, its genesis journaled
    results = node.apply_and_append(requests, business_date=20261124)   # durable on return
    node.close(); node = Node.open(DIR)             # recovered: same arrays, same answers
"""
import glob
import hashlib
import json
import logging
import os
import threading

import msgspec
import numpy as np

from yikatong.engine import Engine, RESULT_DTYPE
from yikatong.engine.config import NodeConfig

from .journal import CorruptLedgerError, Journal, LedgerError, batch_hash, MAP_SIZE_BYTES_DEFAULT
from .records import KIND_CUTOVER, RECORD_DTYPE, RECORD_LAYOUT_VERSION, records_from_batch

log = logging.getLogger("yikatong.ledger")


class NodeSettings(msgspec.Struct, forbid_unknown_fields=True):
    """What a data directory was created with (node.json)."""
    config: NodeConfig
    card_capacity: int
    txn_retention_count: int = 1 << 20
    checkpoint_every_records: int = 1_000_000
    map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT


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
    def __init__(self, data_dir: str, settings: NodeSettings, journal: Journal, engine: Engine):
        self.data_dir = data_dir
        self.settings = settings
        self.journal = journal
        self.engine = engine
        self.checkpoint_seq = 0
        self.failed = None
        self.business_date = journal.last_business_date
        self._checkpoint_thread = None
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
        record = np.zeros(1, dtype=RECORD_DTYPE)
        record["seq"] = self.journal.last_seq + 1
        record["layout_version"] = RECORD_LAYOUT_VERSION
        record["record_kind"] = KIND_CUTOVER
        record["business_date"] = new
        try:
            ticket = self.journal.submit(record, new)
        except Exception as e:
            self.failed = str(e)
            raise
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
        journal = Journal(data_dir, map_size_bytes=settings.map_size_bytes)
        try:
            engine, seq, batch_no, chain_hash = cls._load_checkpoint(data_dir, settings, journal)
            node = cls(data_dir, settings, journal, engine)
            node.checkpoint_seq = seq
            node._replay_tail(batch_no, chain_hash)
        except BaseException:
            journal.close()
            raise
        return node

    @staticmethod
    def _checkpoints(data_dir: str) -> list[str]:
        return sorted(glob.glob(os.path.join(data_dir, "checkpoints", "ckpt-*.json")))

    @classmethod
    def _load_checkpoint(cls, data_dir, settings, journal):
        metas = cls._checkpoints(data_dir)
        if not metas:
            engine = Engine(settings.config, card_capacity=settings.card_capacity,
                            txn_retention_count=settings.txn_retention_count)
            return engine, 0, 0, bytes(32)
        meta_path = metas[-1]
        meta = json.load(open(meta_path))
        arrays, digest = load_checkpoint_arrays(meta_path)
        if digest != meta["file_blake2b"]:
            raise CorruptLedgerError(f"checkpoint {meta['file']}: content hash {digest[:16]}…, expected "
                                     f"{meta['file_blake2b'][:16]}… (torn or altered). Remedy: move it (and its "
                                     f".json) out of checkpoints/; the node then recovers from an older one")
        headers = journal.headers()
        batch_no = int(meta["batch_no"])
        if batch_no > headers.shape[0] or bytes(headers[batch_no - 1]["hash"]).hex() != meta["chain_hash"]:
            raise CorruptLedgerError(f"checkpoint {meta['file']} is at batch {batch_no} whose journal hash does "
                                     f"not match: it does not belong to this journal")
        return Engine(settings.config, arrays=arrays), int(meta["seq"]), batch_no, bytes.fromhex(meta["chain_hash"])

    def _replay_tail(self, after_batch_no: int, checkpoint_hash: bytes):
        """Check the whole hash chain (hashing only: ~1 GB/s), replay the batches after the
        checkpoint. Torn or altered bytes anywhere stop the start-up with the batch named."""
        chain_hash = bytes(32)
        for header, payload in self.journal.batches():
            check_batch(header, payload, chain_hash)
            chain_hash = bytes(header["hash"])
            if int(header["batch_no"]) == after_batch_no and chain_hash != checkpoint_hash:
                raise CorruptLedgerError(f"the checkpoint at batch {after_batch_no} does not match the journal")
            if int(header["batch_no"]) <= after_batch_no:
                continue
            records = np.frombuffer(payload, dtype=RECORD_DTYPE)
            if (records["record_kind"] == KIND_CUTOVER).all():
                continue                                   # a cutover changes no engine state
            results = self.engine.apply_batch(np.ascontiguousarray(records["request"]),
                                              business_date=int(header["business_date"]))
            if results.tobytes() != np.ascontiguousarray(records["result"]).tobytes():
                bad = int(np.flatnonzero(results != records["result"])[0])
                raise CorruptLedgerError(f"replay diverged at sequence {int(records['seq'][bad])}: the engine "
                                         f"answered differently from the journal (engine or configuration changed?)")

    # ---- the write path -----------------------------------------------------------------------
    def submit(self, requests: np.ndarray, business_date: int | None = None) -> tuple[int, np.ndarray]:
        """Apply a batch in memory and hand its records to the writer process; return
        (ticket, results). The results may leave only after `wait_durable(ticket)` returned —
        meanwhile the caller may apply the next batch (pipelining, DESIGN.md §5)."""
        if self.failed:
            raise LedgerError(f"the node stopped after a failed commit ({self.failed}); restart it")
        business_date = business_date or self.business_date
        if business_date < self.business_date:
            raise LedgerError(f"business date {business_date} is before the node's {self.business_date} "
                              f"(after a cutover, 日切, the old date is closed)")
        self.business_date = business_date
        results = self.engine.apply_batch(requests, business_date=business_date)
        records = records_from_batch(requests, results, self.journal.last_seq + 1, business_date)
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

        The arrays are copied here, between batches (a memcpy); with `background=True` the
        file is written by a thread while batches go on committing in the writer process, so a
        checkpoint never stalls commits. Returns the .npz path."""
        self.journal.wait_durable(self.journal.last_batch_no)
        if self._checkpoint_thread is not None:
            # one at a time; the previous started ≥ checkpoint_every_records ago, so this wait
            # is rare and holds the caller only, never a commit in the writer process
            self._checkpoint_thread.join()
        seq, batch_no, chain_hash = self.journal.last_seq, self.journal.last_batch_no, self.journal.last_hash
        arrays = {name: a.copy() for name, a in self.engine.arrays.items()}
        self.checkpoint_seq = seq
        folder = os.path.join(self.data_dir, "checkpoints")
        npz = os.path.join(folder, f"ckpt-{seq:020d}.npz")
        if not background:
            return _write_checkpoint(folder, arrays, seq, batch_no, chain_hash)
        self._checkpoint_thread = threading.Thread(
            target=_write_checkpoint, args=(folder, arrays, seq, batch_no, chain_hash),
            name="checkpoint", daemon=True)
        self._checkpoint_thread.start()
        return npz

    def close(self):
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join()
        self.journal.close()


def _write_checkpoint(folder: str, arrays: dict, seq: int, batch_no: int, chain_hash: bytes) -> str:
    """The checkpoint file and, last, its .json (a checkpoint without it is ignored)."""
    os.makedirs(folder, exist_ok=True)
    name = f"ckpt-{seq:020d}"
    npz = os.path.join(folder, name + ".npz")
    with open(npz + ".tmp", "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.rename(npz + ".tmp", npz)
    digest = file_blake2b(npz)
    meta = {"file": name + ".npz", "seq": seq, "batch_no": batch_no,
            "chain_hash": chain_hash.hex(), "file_blake2b": digest}
    _write_durably(os.path.join(folder, name + ".json"), json.dumps(meta).encode())
    log.info("checkpoint at sequence %d (batch %d): %s", seq, batch_no, npz)
    return npz


def file_blake2b(path: str) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint_arrays(meta_path: str) -> tuple[dict, str]:
    meta = json.load(open(meta_path))
    npz = os.path.join(os.path.dirname(meta_path), meta["file"])
    digest = file_blake2b(npz)
    if digest != meta["file_blake2b"]:
        return {}, digest
    with np.load(npz) as data:
        return {name: data[name].copy() for name in data.files}, digest


def check_batch(header, payload: bytes, prev_hash: bytes):
    """The batch's bytes hash to its header, and the header chains to the previous one."""
    batch_no = int(header["batch_no"])
    if bytes(header["prev_hash"]) != prev_hash:
        raise CorruptLedgerError(f"batch {batch_no}: previous hash {bytes(header['prev_hash']).hex()[:16]}…, "
                                 f"expected {prev_hash.hex()[:16]}… (hash chain broken)")
    if len(payload) != int(header["record_count"]) * RECORD_DTYPE.itemsize:
        raise CorruptLedgerError(f"batch {batch_no}: {len(payload)} bytes of records, expected "
                                 f"{int(header['record_count']) * RECORD_DTYPE.itemsize} (torn)")
    found = batch_hash(prev_hash, payload)
    if found != bytes(header["hash"]):
        raise CorruptLedgerError(f"batch {batch_no} (sequence {int(header['first_seq'])}…{int(header['last_seq'])}): "
                                 f"records hash {found.hex()[:16]}…, header says {bytes(header['hash']).hex()[:16]}… "
                                 f"(records altered)")
