"""Child of the crash tests: open the node, then apply and append batches forever, pipelined
(batch N+1 is applied while N commits), printing "ACK <batch_seq>" once a batch is durable."""
import sys

from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.node import Node

BD = 20261124
CARDS = 100


def batch_size(batch_seq: int) -> int:
    return 1 + (batch_seq * 7919) % 400          # 1 … 400 records, fixed per batch


def batch_requests(engine, batch_seq: int):
    ph = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), CARDS)
    return medical_settlements(engine, ph, batch_size(batch_seq), seed=batch_seq, first_stan=batch_seq * 1000)


def main(data_dir: str):
    node = Node.open(data_dir, lock_wait=True)
    print(f"OPEN {node.batch_seq}", flush=True)
    pending = None
    while True:
        ticket, _ = node.submit(batch_requests(node.engine, node.batch_seq + 1), BD)
        if pending is not None:
            node.wait_durable(pending)
            print(f"ACK {pending}", flush=True)
        pending = ticket


if __name__ == "__main__":
    main(sys.argv[1])
