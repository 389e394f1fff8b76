"""Build request rows by name, for the demo, tests and tools (Python speed: not the hot path;
the codec fills request rows straight from the wire)."""
import hashlib

import numpy as np

from . import Engine, new_requests, Cmd, ReqFlag
from .cardkeys import CardKeys

_stan = [0]


def next_stan() -> int:
    _stan[0] = _stan[0] % 999999 + 1
    return _stan[0]


def request(engine: Engine, keys: CardKeys, cmd: int, *, pan: str | None = None,
            terminal: str | None = None, amount_fen: int = 0, stan: int | None = None,
            batch_no: int = 1, local_date: int = 1124, pin: str | None = None, **fields) -> np.ndarray:
    """One request row (a 1-element array). `terminal` picks terminal and institution indexes;
    `pin` sets the PIN verification value as the codec would; the duplicate key and content
    hash are derived from the fields like the codec derives them from the wire."""
    q = new_requests(1)
    row = q[0]
    row["cmd"] = cmd
    if pan is not None:
        row["pan_hash"] = keys.pan_hash(pan)
        row["pan_last4"] = int(pan[-4:])
    if terminal is not None:
        t = engine.terminal_index[terminal]
        row["terminal_index"] = t
        row["institution_index"] = engine.institution_index[engine.config.terminals[t].institution]
    row["amount_fen"] = amount_fen
    row["stan"] = stan if stan is not None else next_stan()
    row["batch_no"] = batch_no
    row["local_date"] = local_date
    for name, value in fields.items():
        if name == "pan2":
            row["pan2_hash"] = keys.pan_hash(value)
        else:
            row[name] = value
    if pin is not None:
        row["flags"] |= ReqFlag.PIN
        row["pin_pvv"] = keys.pvv(int(row["pan_hash"]), pin)
    mti_class = 4 if cmd == Cmd.REVERSAL else 2
    key = hash((mti_class, int(row["terminal_index"]), int(row["stan"]), int(row["batch_no"]), local_date))
    row["idem_key"] = (key & 0x7FFFFFFFFFFFFFFF) | 1
    content = q.copy()
    content["idem_key"] = 0
    content["pin_pvv"] = 0
    # blake2b, not hash(): bytes hashing is salted per process and this must survive restarts
    row["content_hash"] = int.from_bytes(hashlib.blake2b(content.tobytes(), digest_size=8).digest(), "little")
    return q


def medical(engine, keys, pan, terminal, total_fen, fo_fen, ol_fen, ps_fen, in_scope_fen, *,
            med_type=21, au=True, pa=False, fp_fen=None, post=True, **kw) -> np.ndarray:
    """A medical settlement (81) or, with post=False, a pre-settlement (83)."""
    flags = (ReqFlag.AU if au else 0) | (ReqFlag.PA if pa else 0) | (ReqFlag.FP if fp_fen is not None else 0)
    return request(engine, keys, Cmd.MED_SETTLE if post else Cmd.MED_PRESETTLE, pan=pan,
                   terminal=terminal, amount_fen=total_fen, fo_fen=fo_fen, ol_fen=ol_fen,
                   ps_fen=ps_fen, is_fen=in_scope_fen, fp_fen=fp_fen or 0, med_type=med_type,
                   flags=flags, **kw)
