"""Child of the crash tests: applies and journals batches forever, printing `ACK <last_seq>` after
each durable append (what a server would acknowledge). The parent SIGKILLs it at random moments."""
import os
import sys

from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.node import Node
from yikatong.nodes import init_demo_node

CARDS = 200


def main(data_dir: str):
    if os.path.exists(os.path.join(data_dir, "node.json")):
        node = Node.open(data_dir)
    else:
        node = init_demo_node(data_dir, CARDS, checkpoint_every_records=1500, business_date=20261124,
                              txn_retention_count=1 << 12)
    pan_hashes = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), CARDS)
    print(f"READY {node.journal.last_seq}", flush=True)
    while True:
        seq = node.journal.last_seq
        requests = medical_settlements(node.engine, pan_hashes, 97 + seq % 211, seed=seq, first_stan=seq)
        node.apply_and_append(requests, 20261124 + (seq // 4000))
        print(f"ACK {node.journal.last_seq}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
