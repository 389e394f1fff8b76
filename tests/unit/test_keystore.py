"""Terminal master keys at rest (protocols/keystore.py): encrypted under the master key, checked
by check values, the master key refused inside the data directory."""
import json

import pytest

from yikatong.protocols import _des, keystore

TMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
MASTER = bytes.fromhex("00112233445566778899AABBCCDDEEFF")


def test_round_trip_and_nothing_clear_at_rest(tmp_path):
    keystore.save(str(tmp_path), MASTER, {"T0000001": TMK, "T0000002": bytes(range(16))})
    raw = (tmp_path / "keys.json").read_bytes()
    assert TMK.hex().upper().encode() not in raw and TMK.hex().encode() not in raw and TMK not in raw
    doc = json.loads(raw)
    assert doc["terminals"]["T0000001"] == {"tmk_under_mk": _des.tdes_ecb(MASTER, TMK).hex().upper(),
                                            "kcv": "08D7B4FB"}
    assert keystore.load(str(tmp_path), MASTER) == {"T0000001": TMK, "T0000002": bytes(range(16))}


def test_wrong_master_key_is_an_operational_error(tmp_path):
    keystore.save(str(tmp_path), MASTER, {"T0000001": TMK})
    with pytest.raises(keystore.KeyStoreError, match="another master key.*YIKATONG_MASTER_KEY_FILE"):
        keystore.load(str(tmp_path), bytes(16))


def test_damaged_entry_fails_its_check_value(tmp_path):
    keystore.save(str(tmp_path), MASTER, {"T0000001": TMK})
    doc = json.loads((tmp_path / "keys.json").read_text())
    doc["terminals"]["T0000001"]["tmk_under_mk"] = "00" * 16
    (tmp_path / "keys.json").write_text(json.dumps(doc))
    with pytest.raises(keystore.KeyStoreError, match="T0000001.*check value"):
        keystore.load(str(tmp_path), MASTER)


def test_master_key_file(tmp_path, monkeypatch):
    outside = tmp_path / "secrets" / "mk"
    outside.parent.mkdir()
    outside.write_text(MASTER.hex())
    data = tmp_path / "node"
    data.mkdir()
    monkeypatch.setenv(keystore.MASTER_KEY_ENV, str(outside))
    assert keystore.master_key(str(data)) == MASTER
    inside = data / "mk"
    inside.write_bytes(MASTER)
    monkeypatch.setenv(keystore.MASTER_KEY_ENV, str(inside))
    with pytest.raises(keystore.KeyStoreError, match="inside the data directory"):
        keystore.master_key(str(data))
    outside.write_bytes(b"short")
    monkeypatch.setenv(keystore.MASTER_KEY_ENV, str(outside))
    with pytest.raises(keystore.KeyStoreError, match="found 5 bytes"):
        keystore.master_key(str(data))
    monkeypatch.delenv(keystore.MASTER_KEY_ENV)
    assert keystore.master_key(str(data)) == keystore.DEMO_MASTER_KEY
