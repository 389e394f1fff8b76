"""The operators' admin interface: a local HTTP JSON API with msgspec schemas and a generated
OpenAPI document. Bound to localhost by default; every request needs the bearer token from the
configuration (401 otherwise); a malformed body gets 400 naming the JSON path, never echoing a
value. Every action is an engine command journaled through the node, with the operator's id in
the record (`request.stan` of a lifecycle command carries the operator number).

The command line (`yikatong card …`) calls the same `perform()`.
"""
import hmac
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Optional

import msgspec

from yikatong.engine import Cmd, rc_str
from yikatong.engine.builders import request as build_request

ACTIONS = {
    "activate-social": Cmd.ACTIVATE_SOCIAL, "activate-financial": Cmd.ACTIVATE_FIN,
    "temporary-loss": Cmd.TEMP_LOSS, "formal-loss": Cmd.FORMAL_LOSS, "unloss": Cmd.UNLOSS,
    "replace": Cmd.REPLACE, "cancel": Cmd.CANCEL_CARD, "pin-reset": Cmd.PIN_RESET,
    "pin-unlock": Cmd.PIN_UNLOCK, "family-bind": Cmd.FAMILY_BIND, "family-unbind": Cmd.FAMILY_UNBIND,
}


class CardAction(msgspec.Struct, forbid_unknown_fields=True):
    """One lifecycle action on one card."""
    operator_id: int                                  # the operator's number (journaled)
    pan: str                                          # the card (never logged or echoed)
    new_pan: Optional[str] = None                     # replace: the new card; cancel: who receives the balance;
                                                      # family-bind: the payer
    pin_kind: Literal["social", "bank"] = "social"    # pin-reset / pin-unlock
    new_pin: Optional[str] = None                     # pin-reset: the new (initial) PIN
    stolen: bool = False                              # formal-loss: reported stolen (43)


class ActionResult(msgspec.Struct):
    code: str                                         # response code (PROTOCOL.md §4)
    approved: bool
    pan_last4: str
    insurance_balance_fen: int
    financial_balance_fen: int


class ErrorBody(msgspec.Struct):
    error: str


def safe_validation_message(error: msgspec.ValidationError) -> str:
    """msgspec's message names the JSON path; some kinds also quote the value (an enum), which
    could be card data: drop quoted values, keep the path."""
    return re.sub(r"'[^']*'", "…", str(error))


def openapi() -> dict:
    """The OpenAPI 3.1 document, generated from the msgspec schemas."""
    (action_schema, result_schema, error_schema), components = msgspec.json.schema_components(
        (CardAction, ActionResult, ErrorBody), ref_template="#/components/schemas/{name}")
    paths = {}
    for action in ACTIONS:
        paths[f"/cards/{action}"] = {"post": {
            "summary": f"card lifecycle: {action}",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": action_schema}}},
            "responses": {
                "200": {"description": "the engine's answer", "content": {"application/json": {"schema": result_schema}}},
                "400": {"description": "malformed body (names the JSON path)", "content": {"application/json": {"schema": error_schema}}},
                "401": {"description": "no or wrong token", "content": {"application/json": {"schema": error_schema}}},
            }}}
    return {"openapi": "3.1.0", "info": {"title": "yikatong admin API", "version": "1"},
            "paths": paths, "components": {"schemas": components,
                                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def perform(node, keys, action: str, body: CardAction, business_date: int) -> ActionResult:
    """Apply one admin action through the node (journaled); the CLI and the HTTP API share it."""
    cmd = ACTIONS[action]
    fields = {"stan": body.operator_id % 1_000_000}
    if body.new_pan:
        fields["pan2"] = body.new_pan
    if cmd in (Cmd.PIN_RESET, Cmd.PIN_UNLOCK):
        fields["acct_type"] = 0 if body.pin_kind == "social" else 1
    if cmd == Cmd.PIN_RESET:
        if not body.new_pin:
            raise ValueError("pin-reset needs new_pin")
        fields["pin_pvv_new"] = keys.pvv(keys.pan_hash(body.pan), body.new_pin)
    if cmd == Cmd.REPLACE and body.new_pan:
        fields["pin_pvv"] = keys.pvv(keys.pan_hash(body.new_pan), "888888")
        fields["pin_pvv_new"] = keys.pvv(keys.pan_hash(body.new_pan), "123456")
        node.reserve_cards(node.engine.card_count + 1)
    if cmd == Cmd.FORMAL_LOSS and body.stolen:
        fields["med_type"] = 1
    q = build_request(node.engine, keys, cmd, pan=body.pan, **fields)
    q["idem_key"] = 0                  # an admin action is not a terminal message: no duplicate key
    r = node.apply_and_append(q, business_date)[0]
    code = rc_str(int(r["code"]))
    return ActionResult(code, code == "00", body.pan[-4:], int(r["ins_balance_fen"]), int(r["fin_balance_fen"]))


class AdminServer:
    """`AdminServer(node, keys, token).start(port=0)` → (host, port); `.stop()`."""

    def __init__(self, node, keys, token: str, business_date_fn):
        if len(token) < 16:
            raise ValueError("admin token: at least 16 characters (set admin.token in the config)")
        self.node, self.keys, self.token = node, keys, token
        self.business_date_fn = business_date_fn
        self.lock = threading.Lock()               # one writer: the node is not thread-safe
        self.server = None

    def start(self, host: str = "127.0.0.1", port: int = 0):
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):          # no request lines (they could hold card data)
                pass

            def _send(self, status: int, body):
                data = msgspec.json.encode(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                given = self.headers.get("Authorization", "")
                expected = f"Bearer {admin.token}"
                return hmac.compare_digest(given.encode(), expected.encode())

            def do_GET(self):
                if not self._authorised():
                    return self._send(401, ErrorBody("missing or wrong bearer token"))
                if self.path == "/openapi.json":
                    return self._send(200, openapi())
                self._send(404, ErrorBody("no such path"))

            def do_POST(self):
                if not self._authorised():
                    return self._send(401, ErrorBody("missing or wrong bearer token"))
                prefix = "/cards/"
                action = self.path[len(prefix):] if self.path.startswith(prefix) else ""
                if action not in ACTIONS:
                    return self._send(404, ErrorBody("no such action"))
                length = int(self.headers.get("Content-Length") or 0)
                if length > 64 * 1024:
                    return self._send(413, ErrorBody("body above 65536 bytes"))
                try:
                    body = msgspec.json.decode(self.rfile.read(length), type=CardAction)
                except msgspec.ValidationError as e:
                    return self._send(400, ErrorBody(safe_validation_message(e)))
                except msgspec.DecodeError:
                    return self._send(400, ErrorBody("malformed JSON"))
                try:
                    with admin.lock:
                        result = perform(admin.node, admin.keys, action, body, admin.business_date_fn())
                except ValueError as e:
                    return self._send(400, ErrorBody(str(e)))
                self._send(200, result)

        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[:2]

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
