"""`yikatong verify`: re-check everything the ledger promises (DESIGN.md §6.4, 6.7, 6.8) from the
bytes on disk: contiguous sequence, unbroken hash chain, non-decreasing business dates, money
conserved per business date, replay equal to the journal, every checkpoint equal to the replay."""
import json
import os

import numpy as np

from yikatong.engine import Engine, Cmd, ConfigError, ResFlag
from yikatong.engine.state import DERIVED_ARRAYS, index_content, upgrade_arrays

from .journal import CorruptLedgerError, Journal
from .node import Node, NodeSettings, check_batch, load_checkpoint_arrays
from .records import KIND_CAPACITY, KIND_CUTOVER, RECORD_DTYPE, journaled_capacity


class VerifyError(Exception):
    def __init__(self, seq: int, expected, found, what: str):
        super().__init__(f"broken at sequence {seq}: {what}: expected {expected}, found {found}")
        self.seq, self.expected, self.found, self.what = seq, expected, found, what


def balance_change_fen(results: np.ndarray) -> int:
    """What the results say the sum of all card balances moved by (money in minus money out).
    Legs are what an account paid (negative: credited); a transfer (and its reversal) and a
    cancel that hands the balance to another card move money between cards; ISSUE opens balances."""
    effective = ((results["outcome_flags"] & ResFlag.POSTED) != 0) & \
                ((results["outcome_flags"] & ResFlag.DUPLICATE) == 0)
    issue = effective & (results["cmd"] == Cmd.ISSUE)
    moving = effective & ~issue
    legs = results["ins_leg_fen"] + results["aid_leg_fen"] + results["fin_leg_fen"]
    between_cards = moving & (results["other_slot"] >= 0) & (
        (results["cmd"] == Cmd.TRANSFER) | (results["cmd"] == Cmd.REVERSAL))
    on_cancel = moving & (results["cmd"] == Cmd.CANCEL_CARD) & (results["other_slot"] >= 0)
    opened = results["ins_balance_fen"][issue].sum() + results["fin_balance_fen"][issue].sum()
    return int(opened - legs[moving].sum() + results["fin_leg_fen"][between_cards].sum()
               + legs[on_cancel].sum())


def total_balance_fen(engine: Engine) -> int:
    return int(engine.column("ins_balance_fen").sum()) + int(engine.column("fin_balance_fen").sum())


def verify(data_dir: str) -> dict:
    """Returns counts when everything holds; raises VerifyError at the first broken point."""
    import msgspec
    settings = msgspec.json.decode(open(os.path.join(data_dir, "node.json"), "rb").read(), type=NodeSettings)
    journal = Journal(data_dir, map_size_bytes=settings.map_size_bytes, readonly=True)
    try:
        checkpoints = {}
        for meta_path in Node._checkpoints(data_dir):
            meta = json.load(open(meta_path))
            checkpoints[int(meta["seq"])] = meta_path
        engine = Engine(settings.config, card_capacity=settings.card_capacity,
                        txn_retention_count=settings.txn_retention_count)
        prev_hash, next_seq, last_date = bytes(32), 1, 0
        batches = records_count = 0
        money_by_date: dict[int, int] = {}
        checked_checkpoints = 0
        cutovers = capacity_changes = 0
        for header, payload in journal.batches():
            first = int(header["first_seq"])
            if first != next_seq:
                raise VerifyError(first, next_seq, first, "batch does not continue the sequence")
            try:
                check_batch(header, payload, prev_hash, journal.chain)
            except CorruptLedgerError as e:
                raise VerifyError(first, "matching hashes", "a mismatch", str(e)) from None
            records = np.frombuffer(payload, dtype=RECORD_DTYPE)
            seqs = records["seq"].astype(np.int64)
            expected = np.arange(first, first + records.shape[0])
            if not (seqs == expected).all():
                bad = int(np.flatnonzero(seqs != expected)[0])
                raise VerifyError(int(expected[bad]), int(expected[bad]), int(seqs[bad]), "record sequence")
            bd = int(header["business_date"])
            if bd < last_date:
                raise VerifyError(first, f">= {last_date}", bd, "business date went backwards")
            if (records["business_date"] != bd).any():
                raise VerifyError(first, bd, int(records["business_date"][0]), "record business date")
            res = records["result"]
            kinds = records["record_kind"]
            if (kinds == KIND_CUTOVER).all():
                cutovers += 1                      # 日切: no engine state changes
            elif (kinds == KIND_CAPACITY).all():
                # the card columns grew here (Node.reserve_cards): grow the replay's alike
                engine.reserve(journaled_capacity(records), exact=True)
                capacity_changes += 1
            else:
                replay_commands(engine, records, res, first, bd, money_by_date)
            last = int(header["last_seq"])
            if last in checkpoints:
                arrays, digest = load_checkpoint_arrays(checkpoints[last])
                if not arrays:
                    raise VerifyError(last, "a checkpoint matching its hash", "a torn or altered file",
                                      f"checkpoint {os.path.basename(checkpoints[last])}")
                try:
                    arrays = upgrade_arrays(arrays)      # the derived arrays rebuilt as a load does
                except ConfigError as e:
                    raise VerifyError(last, "a ring this engine wrote", str(e), "checkpoint's ring") from None
                for name, array in engine.arrays.items():
                    # the derived indexes by their content: a rebuild may order a probe run
                    # otherwise than the replay's history did (docs/engine.md)
                    content = index_content if name in DERIVED_ARRAYS else (lambda a: a)
                    if name not in arrays or content(arrays[name]).tobytes() != content(array).tobytes():
                        raise VerifyError(last, "the replayed engine", f"another {name}", "checkpoint = replay")
                checked_checkpoints += 1
            prev_hash, next_seq, last_date = bytes(header["hash"]), last + 1, bd
            batches += 1
            records_count += records.shape[0]
        if checked_checkpoints != len(checkpoints):
            missing = sorted(set(checkpoints) - set(range(next_seq)))
            raise VerifyError(missing[0] if missing else next_seq, "a checkpoint at a batch end",
                              "a checkpoint past the journal or mid-batch", "checkpoint position")
        return {"batches": batches, "records": records_count, "checkpoints": checked_checkpoints,
                "business_dates": len(money_by_date), "last_seq": next_seq - 1, "cutovers": cutovers,
                "capacity_changes": capacity_changes}
    finally:
        journal.close()


def replay_commands(engine, records, res, first: int, bd: int, money_by_date: dict) -> None:
    """One batch of commands: the leg identity of every approved settlement, the replay (same
    answers), and the money the answers say moved (the balances moved by exactly that)."""
    # every medical leg identity (total = fund + legs + cash) on approved settlements
    med = (res["cmd"] == Cmd.MED_SETTLE) & ((res["outcome_flags"] & ResFlag.POSTED) != 0)
    lhs = res["amount_fen"][med]
    rhs = (res["fund_fen"] + res["ins_leg_fen"] + res["aid_leg_fen"] + res["fin_leg_fen"] + res["cash_fen"])[med]
    if (lhs != rhs).any():
        bad = int(np.flatnonzero(lhs != rhs)[0])
        raise VerifyError(int(records["seq"][med][bad]), int(lhs[bad]), int(rhs[bad]),
                          "total = fund + insurance + aid + financial + cash")
    # replay: same answers, and the balances moved by exactly what the answers say
    before = total_balance_fen(engine)
    # the engine's replay loop: each request applied where it lies, its result compared
    # with the recorded one in C (no column copies); rows must be 8-byte aligned
    rows = (records if records.ctypes.data % 8 == 0 else records.copy()).view(np.uint8)
    bad = engine.replay_rows(rows, RECORD_DTYPE.itemsize, RECORD_DTYPE.fields["request"][1],
                             RECORD_DTYPE.fields["result"][1], business_date=bd)
    if bad >= 0:
        raise VerifyError(int(records["seq"][bad]), "the recorded result", "another result on replay", "replay")
    moved = total_balance_fen(engine) - before
    said = balance_change_fen(res)
    if moved != said:
        raise VerifyError(first, said, moved, f"money conserved on business date {bd} (balances moved)")
    money_by_date[bd] = money_by_date.get(bd, 0) + said
