"""The demo node (DEMO.md) kept in a data directory: genesis commands journaled like any other."""
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import NAMED_CARDS, demo_config, genesis_batches, today

from .node import LedgerConfig, Node


def init_demo(data_dir: str, generated_cards: int = 100_000, business_date: int | None = None,
              txn_retention_count: int = 1 << 20, ledger_config: LedgerConfig | None = None) -> Node:
    """Create `data_dir` holding the demo node; returns the open Node (caller closes it)."""
    keys = CardKeys(DEMO_DATA_KEY)
    node = Node.init(data_dir, demo_config(), card_capacity=len(NAMED_CARDS) + generated_cards,
                     txn_retention_count=txn_retention_count, ledger_config=ledger_config)
    bd = business_date or today()
    for batch in genesis_batches(keys, generated_cards):
        results = node.apply_and_append(batch, business_date=bd)
        bad = results["code"] != 0x3030
        if bad.any():
            node.close()
            raise RuntimeError(f"demo genesis: {int(bad.sum())} command(s) refused")
    return node
