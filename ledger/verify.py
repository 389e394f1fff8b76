"""`yikatong verify`: check a data directory end to end, offline, without trusting anything.

What is checked (docs/ledger.md has the reasons):
  1. batch headers: contiguous batch and record sequences, each prev_digest equal to the
     previous batch's digest, business dates never decrease (DESIGN.md §6.7);
  2. every batch: value size = record count × 304 (no torn record), BLAKE2b(header ‖ records)
     equal to the stored digest, record seq contiguous, layout version, record business date
     equal to the batch's;
  3. amounts, per approved medical settlement (就医结算, cmd 5, posted):
     total = fund + insurance leg + family-aid leg + financial leg + cash (DESIGN.md §6.3);
  4. money conserved per business date (§6.4): the change of Σ(insurance + financial balances)
     over all cards during the date's replay equals Σ opening balances of approved ISSUEs minus
     Σ legs (insurance + aid + financial) of posted settlements ("00" and partial "10"). Dates holding any other money
     command are counted as "conservation not checked" (their flows are defined by the engine
     issue, not here);
  5. replay: every batch replayed from an empty engine gives the recorded results byte for
     byte, and the engine arrays at each checkpoint's sequence equal the checkpoint's arrays.
The first broken point is reported as (what, sequence, expected, found).
"""
import dataclasses
import os

import msgspec
import numpy as np

from yikatong.engine import Cmd, ResFlag

from . import checkpoint as ckpt
from .node import (NodeMeta, _check_dir, batch_records, check_header_chain, new_engine,
                   read_headers, replay_batch)
from .store import DB_HEADERS, DB_META, LedgerCorrupt, LedgerError, open_dbs, open_env, DATA_LAYOUT_VERSION

APPROVED = 0x3030                       # "00"
FLOW_CMDS = {Cmd.ISSUE, Cmd.MED_SETTLE}  # commands whose money flows this check understands
NO_MONEY_CMDS = {Cmd.BALANCE, Cmd.MED_PRESETTLE, Cmd.ACTIVATE_SOCIAL, Cmd.ACTIVATE_FIN,
                 Cmd.TEMP_LOSS, Cmd.FORMAL_LOSS, Cmd.UNLOSS, Cmd.FAMILY_BIND, Cmd.FAMILY_UNBIND,
                 Cmd.PIN_CHANGE, Cmd.PIN_RESET, Cmd.PIN_UNLOCK}


@dataclasses.dataclass
class VerifyReport:
    records: int = 0
    batches: int = 0
    business_dates: int = 0
    settlements_checked: int = 0
    dates_conserved: int = 0
    dates_not_checked: int = 0
    checkpoints_equal: int = 0

    def line(self) -> str:
        return (f"OK: {self.records} records in {self.batches} batches, {self.business_dates} business "
                f"date(s); hash chain unbroken; {self.settlements_checked} settlements satisfy total = "
                f"fund + ins + aid + fin + cash; money conserved on {self.dates_conserved} date(s) "
                f"({self.dates_not_checked} not checked: other money commands); "
                f"{self.checkpoints_equal} checkpoint(s) equal to replay")


def _balance_sum_fen(engine) -> int:
    cards = engine.arrays["cards"]
    return int(cards["ins_balance_fen"].sum(dtype=np.int64)) + int(cards["fin_balance_fen"].sum(dtype=np.int64))


def verify(data_dir: str) -> VerifyReport:
    """Run every check; raise LedgerCorrupt (first broken point) or LedgerError."""
    path = _check_dir(data_dir, must_hold_ledger=True)
    env = open_env(path, 1 << 20, 8, readonly=True)
    try:
        dbs = open_dbs(env, create=False)
        with env.begin() as txn:
            raw = txn.get(b"node", db=dbs[DB_META])
        if raw is None:
            raise LedgerError(f"{path}: node metadata missing")
        version = msgspec.json.decode(raw).get("data_layout_version", 0)
        if version > DATA_LAYOUT_VERSION:
            raise LedgerError(f"{path} has data layout version {version}; this yikatong reads up to "
                              f"{DATA_LAYOUT_VERSION}. Remedy: run the newer yikatong")
        meta = msgspec.json.decode(raw, type=NodeMeta)
        env.close()
        env = open_env(path, meta.ledger.map_size_bytes, meta.ledger.max_dbs, readonly=True)
        dbs = open_dbs(env, create=False)
        return _verify(path, env, dbs, meta)
    finally:
        env.close()


def _verify(path, env, dbs, meta) -> VerifyReport:
    report = VerifyReport()
    headers = read_headers(env, dbs)
    check_header_chain(headers)
    checkpoints = {}
    for seq, cpath in ckpt.list_checkpoints(path):
        checkpoints[seq] = cpath
    engine = new_engine(meta)
    date, date_start_fen, date_expected_fen, date_checkable = None, 0, 0, True

    def close_date():
        if date is None:
            return
        report.business_dates += 1
        if not date_checkable:
            report.dates_not_checked += 1
            return
        found = _balance_sum_fen(engine) - date_start_fen
        if found != date_expected_fen:
            raise LedgerCorrupt(f"money conservation on business date {date} (Σ balance change, fen)",
                                last_seq_of_date, date_expected_fen, found)
        report.dates_conserved += 1

    last_seq_of_date = 0
    with env.begin(buffers=True) as txn:
        for i in range(headers.shape[0]):
            h = headers[i]
            bd = int(h["business_date"])
            records = batch_records(txn, dbs, h)
            if np.any(records["business_date"] != bd):
                bad = int(np.flatnonzero(records["business_date"] != bd)[0])
                raise LedgerCorrupt("record business date", int(records["seq"][bad]), bd,
                                    int(records["business_date"][bad]))
            if bd != date:
                close_date()
                date, date_start_fen, date_expected_fen, date_checkable = bd, _balance_sum_fen(engine), 0, True
            res, req = records["result"], records["request"]
            cmd = req["cmd"]
            ok = res["code"] == APPROVED
            # posted, not a duplicate's repeated answer: approvals "00" and partial approvals "10"
            posted = ((res["outcome_flags"] & ResFlag.POSTED) != 0) & ((res["outcome_flags"] & ResFlag.DUPLICATE) == 0)
            settle = posted & (cmd == Cmd.MED_SETTLE)
            legs = res["ins_leg_fen"] + res["aid_leg_fen"] + res["fin_leg_fen"]
            identity = res["fund_fen"] + legs + res["cash_fen"]
            bad = np.flatnonzero(settle & (res["amount_fen"] != identity))
            if bad.size:
                k = int(bad[0])
                raise LedgerCorrupt("settlement identity total = fund + ins + aid + fin + cash (fen)",
                                    int(records["seq"][k]), int(res["amount_fen"][k]), int(identity[k]))
            report.settlements_checked += int(settle.sum())
            issue = ok & (cmd == Cmd.ISSUE)
            date_expected_fen += int((req["amount_fen"][issue] + req["amount2_fen"][issue]).sum())
            date_expected_fen -= int(legs[settle].sum())
            known = np.isin(cmd, list(FLOW_CMDS | NO_MONEY_CMDS)) | ~(ok | posted)
            if not known.all():
                date_checkable = False
            replay_batch(engine, records, bd)
            last_seq_of_date = int(h["last_seq"])
            report.batches += 1
            report.records += records.shape[0]
            cpath = checkpoints.get(last_seq_of_date)
            if cpath:
                _, arrays = ckpt.read_checkpoint(cpath)
                for name, a in engine.arrays.items():
                    if name not in arrays or arrays[name].tobytes() != a.tobytes():
                        raise LedgerCorrupt(f"checkpoint {os.path.basename(cpath)} array '{name}' vs replay",
                                            last_seq_of_date, "the replayed bytes", "different bytes")
                report.checkpoints_equal += 1
    close_date()
    stray = [s for s in checkpoints if s > report.records or s not in
             set(int(x) for x in headers["last_seq"])]
    if stray:
        raise LedgerCorrupt("checkpoint not at a batch end of the journal", stray[0],
                            "the last sequence of a committed batch", stray[0])
    return report
