"""The naive baseline server (bench/baseline/server.py) as a real subprocess on port 0, driven by
the independent client: sign-on, medical settlements (DOMAIN.md case A, a 51 decline, partial
approval), MACs on replies in both algorithms, the error replies, and a short load run."""
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from bench.baseline import client as cl
from bench.baseline import loadgen
from bench.baseline.crypto import check_value

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["delete", "wal"])
def server(request, tmp_path_factory):
    db = tmp_path_factory.mktemp("baseline") / "base.db"
    cmd = [sys.executable, "-m", "bench.baseline.server", "--port", "0", "--db", str(db),
           "--cards", "200"]
    if request.param == "wal":
        cmd.append("--wal")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening on (\S+):(\d+)\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield match.group(1), int(match.group(2))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def terminal(server, tid="T0000001", mid="H11000000000001", mac_alg="x9.19", **kw):
    host, port = server
    return cl.Terminal(host, port, tid, mid, cl.DEMO_TMK, mac_alg, **kw)


def test_not_signed_on_is_77_with_sign_on_header_and_no_mac(server):
    with terminal(server, "T0000002", "H11000000000002") as t:
        reply = t.medical(cl.generated_pan(1), 1000)
        assert (reply.mti, reply.code, reply.sign_on_requested) == ("0210", "77", True)
        assert "64" not in reply.fields and reply.mac_ok is None
        assert reply.tpdu == bytes.fromhex("6000000003")   # destination and source swapped
        assert reply.header[:2] == cl.DEFAULT_HEADER[:2]


def test_unregistered_terminal_is_97(server):
    with terminal(server, "T9999999") as t:
        reply = t.sign_on()
        assert (reply.mti, reply.code) == ("0810", "97")
        assert "64" not in reply.fields


def test_sign_on_keys_and_medical_settlement(server):
    with terminal(server) as t:
        reply = t.sign_on()
        assert (reply.mti, reply.code, reply.fields["32"]) == ("0810", "00", "48020000")
        assert "64" not in reply.fields
        assert reply.fields["60"] == "00000001003"
        f62 = reply.fields["62"]
        assert f62[16:20] == check_value(t.pin_key) and f62[36:40] == check_value(t.mac_key)

        # Generated card k=5: region 310000, in service, insurance 100000 + 5*100.
        # Shanghai outpatient: deductible 150000 per year, so 10000 is all deductible.
        pan = cl.generated_pan(5)
        reply = t.medical(pan, 10000, is_=10000, med_type="11")
        assert (reply.mti, reply.code, reply.mac_ok) == ("0210", "00", True)
        assert reply.tlv["FP"] == "0" and reply.tlv["DE"] == "10000"
        assert (reply.tlv["AP"], reply.tlv["BP"], reply.tlv["IB"], reply.tlv["BB"]) == \
            ("10000", "0", "90500", "5000000")
        assert reply.balance("91") == 90500 and reply.balance("10") == 5000000
        assert set(reply.fields) >= {"11", "12", "13", "15", "32", "37", "38", "39", "41", "42",
                                     "54", "60", "62", "64"}


def test_case_a_then_decline_51_then_partial_approval(server):
    """DOMAIN.md worked examples A and D on card …0017 at T0000001 (DEMO.md)."""
    claim = dict(fo=300000, ol=50000, ps=100000, is_=4550000, med_type="21")
    with terminal(server, stan_start=500) as t:
        t.sign_on()
        a = t.medical("6214830000000017", 5000000, **claim)
        assert (a.code, a.mac_ok) == ("00", True)
        assert {k: a.tlv[k] for k in ("FP", "DE", "AP", "BP", "IB", "BB")} == {
            "FP": "3862000", "DE": "130000", "AP": "200000", "BP": "938000",
            "IB": "0", "BB": "1062000"}
        assert int(a.tlv["FP"]) + int(a.tlv["AP"]) + int(a.tlv["BP"]) == 5000000

        d = t.medical("6214830000000017", 5000000, **claim)
        assert (d.code, d.mac_ok) == ("51", True)
        assert "62" not in d.fields and "38" not in d.fields
        assert d.balance("10") == 1062000 and d.balance("91") == 0   # no effect

        p = t.medical("6214830000000017", 5000000, pa="1", **claim)
        assert (p.code, p.mac_ok) == ("10", True)
        assert {k: p.tlv[k] for k in ("FP", "AP", "BP", "CP", "BB")} == {
            "FP": "3917250", "AP": "0", "BP": "1062000", "CP": "20750", "BB": "0"}


def test_cups_ecb_terminal(server):
    with terminal(server, "T0000007", mac_alg="cups-ecb") as t:
        assert t.sign_on().code == "00"
        reply = t.medical(cl.generated_pan(7), 2000)
        assert (reply.code, reply.mac_ok) == ("00", True)
        assert all(c in b"0123456789ABCDEF" for c in reply.fields["64"])


def test_bad_mac_is_a0_and_three_force_sign_on(server):
    with terminal(server, "T0000003", "H31000000000001") as t:
        t.sign_on()
        good_key = t.mac_key
        t.mac_key = bytes(16)
        for _ in range(2):
            reply = t.medical(cl.generated_pan(9), 1000)
            assert (reply.code, reply.sign_on_requested) == ("A0", False)
            t.mac_key = good_key
            assert cl.verify(reply.body, "x9.19", good_key)   # replies are MACed all the same
            t.mac_key = bytes(16)
        reply = t.medical(cl.generated_pan(9), 1000)
        assert (reply.code, reply.sign_on_requested) == ("A0", True)
        t.mac_key = good_key
        assert t.medical(cl.generated_pan(9), 1000).code == "77"
        assert t.sign_on().code == "00"
        assert t.medical(cl.generated_pan(9), 1000).code == "00"


def test_repeat_duplicate_and_amount_identity(server):
    with terminal(server, "T1000200") as t:
        t.sign_on()
        request = cl.medical_request(amount_fen=1500, tlv=cl.medical_tlv(
            med_type="11", fo=0, ol=0, ps=0, is_=1500), pan=cl.generated_pan(11), **t.common())
        first = t.send(request)
        again = t.send(request)
        assert first.code == again.code == "00" and again.mac_ok
        assert again.fields["37"] == first.fields["37"]           # the original response
        assert again.balance("91") == first.balance("91")
        changed = dict(request, **{"4": "000000001600", "62": cl.medical_tlv(
            med_type="11", fo=0, ol=0, ps=0, is_=1600)})
        assert t.send(changed).code == "94"
        wrong_sum = t.medical(cl.generated_pan(11), 1500, fo=1, ol=0, ps=0, is_=1500)
        assert wrong_sum.code == "13"
        unknown = t.medical("6214839999999999", 1500)
        assert unknown.code == "14"


def test_pipelined_replies_match(server):
    with terminal(server, "T1000201") as t:
        t.sign_on()
        requests = [cl.medical_request(amount_fen=100 + i, tlv=cl.medical_tlv(
            med_type="11", fo=0, ol=0, ps=0, is_=100 + i), pan=cl.generated_pan(20 + i),
            **t.common()) for i in range(5)]
        replies = t.send_pipelined(requests)
        assert [r.fields["11"] for r in replies] == [r["11"] for r in requests]
        assert all(r.code == "00" and r.mac_ok for r in replies)


def test_oversized_frame_closes_the_connection(server):
    with socket.create_connection(server, timeout=5) as sock:
        sock.sendall(b"\x08\x01")   # declares 2049 bytes
        assert sock.recv(10) == b""


def test_loadgen_short_run(server):
    host, port = server
    result = loadgen.main(["--host", host, "--port", str(port), "--connections", "2",
                           "--pipeline", "2", "--duration-s", "0.5", "--cards", "200",
                           "--terminal-first", "100", "--seed", "1"])
    assert result["messages"] > 0 and result["errors"] == {}
    assert result["bad_macs"] == 0 and set(result["codes"]) == {"00"}
