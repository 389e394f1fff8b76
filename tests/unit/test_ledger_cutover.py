"""日切: a cutover record in the journal; each transaction lands on exactly one business date,
assigned at commit; replay and verify step over it; a closed date cannot be written again."""
import numpy as np
import pytest

from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.journal import LedgerError
from yikatong.ledger.node import Node
from yikatong.ledger.records import KIND_COMMAND, KIND_CUTOVER
from yikatong.ledger.verify import verify
from yikatong.nodes import init_demo_node

KEYS = CardKeys(DEMO_DATA_KEY)


def test_cutover_splits_the_journal(tmp_path):
    path = str(tmp_path / "node")
    node = init_demo_node(path, 50, business_date=20261231, txn_retention_count=1 << 12)
    requests = medical_settlements(node.engine, generated_pan_hashes(KEYS, 50), 900, seed=11)
    before = node.apply_and_append(requests[:300])
    assert (before["business_date"] == 20261231).all()
    assert node.cutover() == 20270101                           # New Year: the next calendar day
    after = node.apply_and_append(requests[300:600])
    assert (after["business_date"] == 20270101).all()
    with pytest.raises(LedgerError, match="business date 20261231 is before the node's 20270101"):
        node.apply_and_append(requests[600:], 20261231)
    with pytest.raises(LedgerError, match="already 20270101"):
        node.cutover(20270101)
    node.close()
    node = Node.open(path)                                        # replay steps over the cutover
    assert node.business_date == 20270101
    records = node.journal.read()
    node.close()
    kinds = records["record_kind"]
    cut = int(np.flatnonzero(kinds == KIND_CUTOVER)[0])
    assert (kinds == KIND_CUTOVER).sum() == 1
    assert (records["business_date"][:cut] <= 20261231).all() and (records["business_date"][cut:] == 20270101).all()
    commands = records[kinds == KIND_COMMAND]
    assert np.unique(commands["seq"]).shape[0] == commands.shape[0]     # exactly one side each
    report = verify(path)
    assert (report["cutovers"], report["business_dates"]) == (1, 2)
