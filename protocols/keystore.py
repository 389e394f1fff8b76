"""Terminal master keys at rest: encrypted under the node master key, never in clear.

keys.json in the data directory holds, per terminal, its TMK encrypted under the node master key
(double-length 3DES, ECB — the "key under LMK" form of a payment HSM) and the TMK's check value,
so a wrong master key is detected at start-up instead of producing wrong session keys. The
master key itself is never in the data directory, the repository, the journal or a log: it
comes from the file named by YIKATONG_MASTER_KEY_FILE (16 bytes raw, or 32 hex characters),
outside the data directory. Session keys (sign-on) live in memory only. Without the variable a
node runs with the demo master key and says so in its log: a demo only. docs/server.md gives the
production path to an HSM (the TMKs and the working-key derivation move behind its API).
"""
import hashlib
import json
import logging
import os

from . import _des

MASTER_KEY_ENV = "YIKATONG_MASTER_KEY_FILE"
DEMO_MASTER_KEY = hashlib.blake2b(b"yikatong demo node master key", digest_size=16).digest()
KEYS_FILE = "keys.json"

log = logging.getLogger("yikatong.keys")


class KeyStoreError(RuntimeError):
    """An operational error about key material: what is wrong and what to do."""


def master_key(data_dir: str | None = None) -> bytes:
    path = os.environ.get(MASTER_KEY_ENV)
    if not path:
        log.warning("YIKATONG_MASTER_KEY_FILE is not set: terminal keys are protected by the demo master key "
                    "(a demo only; see docs/server.md)")
        return DEMO_MASTER_KEY
    real = os.path.realpath(path)
    if data_dir and (real + os.sep).startswith(os.path.realpath(data_dir) + os.sep):
        raise KeyStoreError(f"{MASTER_KEY_ENV} points inside the data directory: keep the master key on another "
                            f"volume (or in an HSM), never beside the data it protects")
    raw = open(real, "rb").read().strip()
    if len(raw) == 32:
        try:
            raw = bytes.fromhex(raw.decode("ascii"))
        except ValueError:
            pass
    if len(raw) != 16:
        raise KeyStoreError(f"{MASTER_KEY_ENV}: expecting 16 bytes (or 32 hex characters) of double-length 3DES "
                            f"key; found {len(raw)} bytes")
    return raw


def save(data_dir: str, master: bytes, tmks: dict) -> None:
    """Write keys.json: {terminal id: {tmk_under_mk, kcv}} durably (write, fsync, rename)."""
    from yikatong.ledger.node import _write_durably
    doc = {"version": 1, "algorithm": "3des-ecb-under-master-key",
           "master_kcv": _des.check_value(master).hex().upper(),
           "terminals": {tid: {"tmk_under_mk": _des.tdes_ecb(master, tmk).hex().upper(),
                               "kcv": _des.check_value(tmk).hex().upper()} for tid, tmk in sorted(tmks.items())}}
    _write_durably(os.path.join(data_dir, KEYS_FILE), json.dumps(doc, indent=1).encode())


def load(data_dir: str, master: bytes) -> dict:
    """{terminal id: clear TMK}, each verified against its check value."""
    path = os.path.join(data_dir, KEYS_FILE)
    if not os.path.exists(path):
        log.warning("no keys.json in the data directory: terminals cannot sign on (answer 96) until their master "
                    "keys are loaded")
        return {}
    doc = json.load(open(path))
    if doc.get("master_kcv") != _des.check_value(master).hex().upper():
        raise KeyStoreError(f"{path} was written under another master key (check value "
                            f"{doc.get('master_kcv')}, this one {_des.check_value(master).hex().upper()}): "
                            f"set {MASTER_KEY_ENV} to the node's master key file")
    out = {}
    for tid, entry in doc["terminals"].items():
        tmk = _des.tdes_ecb(master, bytes.fromhex(entry["tmk_under_mk"]), decrypt=True)
        if _des.check_value(tmk).hex().upper() != entry["kcv"]:
            raise KeyStoreError(f"terminal {tid}: its master key does not match its check value (keys.json damaged?)")
        out[tid] = tmk
    return out
