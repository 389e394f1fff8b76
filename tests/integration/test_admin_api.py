"""The admin API over a real HTTP connection on port 0: auth (401), malformed bodies (400 with the
JSON path), lifecycle actions journaled, and the generated OpenAPI document."""
import http.client
import json
import subprocess
import sys

import pytest

from yikatong.admin_api import AdminServer, openapi
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.nodes import init_demo_node

TOKEN = "test-token-0123456789"
BD = 20261124


@pytest.fixture
def server(tmp_path):
    node = init_demo_node(str(tmp_path / "node"), 10, business_date=BD, txn_retention_count=1 << 12)
    admin = AdminServer(node, CardKeys(DEMO_DATA_KEY), TOKEN, lambda: BD)
    host, port = admin.start(port=0)
    yield host, port, node, str(tmp_path / "node")
    admin.stop()
    node.close()


def call(host, port, method, path, body=None, token=TOKEN, raw=None):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    out = response.status, json.loads(response.read() or b"null")
    conn.close()
    return out


def test_token_required(server):
    host, port, _, _ = server
    assert call(host, port, "GET", "/openapi.json", token=None) == (401, {"error": "missing or wrong bearer token"})
    assert call(host, port, "POST", "/cards/formal-loss", {"operator_id": 7, "pan": "6214830000000017"},
                token="wrong-token-0123456789")[0] == 401


def test_malformed_bodies_name_the_path(server):
    host, port, _, _ = server
    status, body = call(host, port, "POST", "/cards/formal-loss", {"operator_id": "x", "pan": "6214830000000017"})
    assert (status, body) == (400, {"error": "Expected `int`, got `str` - at `$.operator_id`"})
    status, body = call(host, port, "POST", "/cards/formal-loss", {"operator_id": 1})
    assert (status, body) == (400, {"error": "Object missing required field `pan`"})
    status, body = call(host, port, "POST", "/cards/formal-loss", raw=b"{not json")
    assert (status, body) == (400, {"error": "malformed JSON"})
    status, body = call(host, port, "POST", "/cards/pin-reset", {"operator_id": 1, "pan": "6214830000000017",
                                                                  "pin_kind": "atm"})
    assert (status, body) == (400, {"error": "Invalid enum value … - at `$.pin_kind`"})


def test_lifecycle_actions_are_journaled(server):
    host, port, node, data_dir = server
    seq = node.journal.last_seq
    status, body = call(host, port, "POST", "/cards/temporary-loss", {"operator_id": 42, "pan": "6214830000000017"})
    assert (status, body["code"], body["pan_last4"]) == (200, "00", "0017")
    status, body = call(host, port, "POST", "/cards/unloss", {"operator_id": 42, "pan": "6214830000000017"})
    assert body["code"] == "00"
    status, body = call(host, port, "POST", "/cards/unloss", {"operator_id": 42, "pan": "6214830000000017"})
    assert body["code"] == "12"                                   # not temporarily lost any more
    status, body = call(host, port, "POST", "/cards/replace",
                        {"operator_id": 43, "pan": "6214830000000058", "new_pan": "6214830000001007"})
    assert (body["code"], body["insurance_balance_fen"]) == ("00", 0)
    records = node.journal.read(seq + 1)
    # verify from another process, beside the running node (a read-only snapshot, no node lock)
    out = subprocess.run([sys.executable, "-m", "yikatong.main", "verify", "--data", data_dir],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"OK: {seq + 4:,} records"), out.stdout + out.stderr
    assert list(records["request"]["stan"]) == [42, 42, 42, 43]   # the operator of each action
    assert records["request"]["cmd"].tolist() == [35, 37, 37, 38]


def test_openapi_document(server):
    host, port, _, _ = server
    status, doc = call(host, port, "GET", "/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(openapi()))
    assert set(doc["paths"]) == {f"/cards/{a}" for a in ("activate-social", "activate-financial", "temporary-loss",
                                                          "formal-loss", "unloss", "replace", "cancel", "pin-reset",
                                                          "pin-unlock", "family-bind", "family-unbind")}
    assert doc["components"]["schemas"]["CardAction"]["required"] == ["operator_id", "pan"]
