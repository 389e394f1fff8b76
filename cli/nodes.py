"""Wiring a whole node: configuration + engine + ledger (the command line's job, rule 7)."""
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import NAMED_CARDS, demo_config, genesis_batches, today
from yikatong.ledger.node import Node, NodeSettings


def init_demo_node(data_dir: str, generated_cards: int = 100_000, checkpoint_every_records: int = 1_000_000,
                   business_date: int | None = None, spare_cards: int = 1024,
                   txn_retention_count: int = 1 << 20, checkpoint_by: str = "copy") -> Node:
    settings = NodeSettings(config=demo_config(), card_capacity=len(NAMED_CARDS) + generated_cards + spare_cards,
                            checkpoint_every_records=checkpoint_every_records,
                            txn_retention_count=txn_retention_count, checkpoint_by=checkpoint_by)
    node = Node.init(data_dir, settings, genesis_batches(CardKeys(DEMO_DATA_KEY), generated_cards),
                     business_date or today())
    # DEMO.md: every demo terminal has the same TMK; at rest it is encrypted under the master key
    from yikatong.engine.demo import DEMO_TMK_HEX
    from yikatong.protocols import keystore
    tmk = bytes.fromhex(DEMO_TMK_HEX)
    keystore.save(data_dir, keystore.master_key(data_dir), {t.terminal_id: tmk for t in settings.config.terminals})
    return node


def node_keys():
    """The node's data key: YIKATONG_DATA_KEY_FILE (32 bytes, outside the data directory), else
    the demo key (a demo only; see docs/engine.md)."""
    import logging
    import os
    path = os.environ.get("YIKATONG_DATA_KEY_FILE")
    if path:
        return CardKeys(open(path, "rb").read())
    logging.getLogger("yikatong").warning("YIKATONG_DATA_KEY_FILE is not set: using the demo node's data key")
    return CardKeys(DEMO_DATA_KEY)
