"""yikatong.protocols — the outside world: framing, the ISO 8583 codec, MAC/PIN security, the
server, the admin interface, the terminal client. May import yikatong.engine and yikatong.ledger."""
