"""Group commit through the writer process: batch N+1 is applied while N commits; a ticket is
acknowledged only once its batch is committed, in order; a dead writer stops the node."""
import os
import signal

import pytest

from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.journal import Journal, LedgerError
from yikatong.ledger.node import Node
from yikatong.nodes import init_demo_node

BD = 20261124


def test_submit_overlaps_and_acks_in_order(tmp_path):
    node = init_demo_node(str(tmp_path / "n"), 100, business_date=BD, txn_retention_count=1 << 12)
    q = medical_settlements(node.engine, generated_pan_hashes(CardKeys(DEMO_DATA_KEY), 100), 3000, seed=4)
    first = node.journal.acked_batch_no
    tickets = [node.submit(q[i:i + 1000], BD)[0] for i in range(0, 3000, 1000)]
    assert tickets == [first + 1, first + 2, first + 3]
    assert node.journal.acked_batch_no <= first + 3          # nothing acknowledged by submit itself
    node.wait_durable(tickets[1])
    assert node.journal.acked_batch_no == tickets[1]        # acks arrive in order, one by one
    node.wait_durable(tickets[2])
    live = {k: v.tobytes() for k, v in node.engine.arrays.items()}
    node.close()
    reader = Journal(str(tmp_path / "n"), readonly=True)
    assert reader.last_seq == 8 + 1 + 100 + 3000
    reader.close()
    node = Node.open(str(tmp_path / "n"))
    assert {k: v.tobytes() for k, v in node.engine.arrays.items()} == live
    node.close()


def test_dead_writer_stops_the_node(tmp_path):
    node = init_demo_node(str(tmp_path / "n"), 100, business_date=BD, txn_retention_count=1 << 12)
    q = medical_settlements(node.engine, generated_pan_hashes(CardKeys(DEMO_DATA_KEY), 100), 10, seed=4)
    os.kill(node.journal._writer.pid, signal.SIGKILL)
    node.journal._writer.wait()
    with pytest.raises(LedgerError, match=r"the writer process exited \(code -9\)"):
        node.apply_and_append(q, BD)
    with pytest.raises(LedgerError, match="stopped after a failed commit"):
        node.apply_and_append(q, BD)
    node.close()


def test_ready_handshake_is_read_with_the_first_ack_one_read_at_a_time(tmp_path):
    """start_writer does not wait for the writer process to be ready (its start-up overlaps
    recovery); the first _read_ack consumes the handshake only, as the server's add_reader
    callback expects (one read per readable event, never a blocking wait for the next ack)."""
    from yikatong.engine.demo import demo_engine
    from yikatong.ledger.records import records_from_batch
    engine, _ = demo_engine(generated_cards=50, business_date=BD, txn_retention_count=1 << 10)
    q = medical_settlements(engine, generated_pan_hashes(CardKeys(DEMO_DATA_KEY), 50), 5, seed=1)
    records = records_from_batch(q, engine.apply_batch(q, business_date=BD), 1, BD)
    journal = Journal(str(tmp_path / "j"), create=True)
    try:
        journal.start_writer()
        ticket = journal.submit(records, BD)
        journal._read_ack(journal.acked_batch_no + 1)
        assert journal.acked_batch_no == 0                   # that read was the handshake
        journal._read_ack(journal.acked_batch_no + 1)
        assert journal.acked_batch_no == ticket == 1
        assert journal.append(_next(records, 6), BD)["last_seq"] == 10
    finally:
        journal.close()


def _next(records, first_seq):
    out = records.copy()
    out["seq"] = range(first_seq, first_seq + out.shape[0])
    return out
