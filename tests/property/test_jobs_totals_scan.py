"""对总账 fast path: over random workloads (settlements, cancels, reversals, duplicates, card
replacements, cutovers, several date ranges) the scan (ledger/_totals.pyx) + DuckDB gives exactly
the SQL path's table (`totals` over `flatten`), from records in memory and straight from the
journal; a journal whose order the scan cannot trust falls back to the SQL answer."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from yikatong.engine import Cmd
from yikatong.engine.builders import medical, request
from yikatong.ledger import jobs
from yikatong.nodes import init_demo_node

from test_jobs_totals import KEYS, PANS, TERMINALS, _cancel, _reversal   # the same demo cards and builders
BD = 20261124

op = st.tuples(st.sampled_from(["settle", "settle", "settle", "cancel", "reverse", "repeat", "replace", "cutover"]),
               st.integers(0, 3), st.integers(0, 2), st.integers(100, 3_000_000), st.integers(0, 50))


def sql_totals(records, config, date_from, date_to):
    return jobs.totals(jobs.connect(jobs.flatten(records), jobs.dimensions(config, records)), date_from, date_to)


def scan_totals(records, config, date_from, date_to):
    scan = jobs.totals_scan(records.shape[0], config, date_from, date_to)
    scan.feed(records.view(np.uint8))
    return scan, jobs.totals_from_scan(scan)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=5, max_size=60))
def test_scan_equals_sql_path(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("scan") / "node")
    node = init_demo_node(path, 10, business_date=BD, txn_retention_count=1 << 12)
    try:
        pans = list(PANS)
        settled, sent = [], []
        for i, (kind, card, term, amount, ref) in enumerate(ops):
            if kind == "cutover":
                node.cutover()
            elif kind == "replace":
                new = f"62148300{900_000 + i:07d}"
                new = new + str(_luhn(new))
                node.engine.reserve(node.engine.card_count + 1)
                r = node.apply_and_append(request(node.engine, KEYS, Cmd.REPLACE, pan=pans[card], pan2=new,
                                                  pin_pvv=KEYS.pvv(KEYS.pan_hash(new), "888888"), stan=1000 + i))[0]
                if r["code"] == 0x3030:
                    pans[card] = new
            elif kind == "repeat" and sent:
                node.apply_and_append(sent[ref % len(sent)])          # same key, same content: a duplicate
            elif kind in ("settle", "repeat") or not settled:
                q = medical(node.engine, KEYS, pans[card], TERMINALS[term], amount, 0, 0, 0, amount,
                            med_type=21 if card % 2 else 11, pa=True, stan=1000 + i)
                r = node.apply_and_append(q)[0]
                sent.append(q)
                if r["code"] in (0x3030, 0x3031):
                    settled.append((q, r))
            elif kind == "cancel":
                q0, r0 = settled[ref % len(settled)]
                q = _cancel(node, q0, r0, 1000 + i)
                node.apply_and_append(q)
                sent.append(q)
            else:
                q0, _ = settled[ref % len(settled)]
                rev = _reversal(q0)
                node.apply_and_append(rev)
                sent.append(rev)
        records = node.journal.read()
        last_date = node.business_date
        config = node.engine.config
    finally:
        node.close()
    for date_from, date_to in ((BD, BD), (BD, last_date), (last_date, last_date), (BD + 1, 99991231)):
        expected = sql_totals(records, config, date_from, date_to)
        scan, got = scan_totals(records, config, date_from, date_to)
        assert scan.fallback_reason is None                       # the engine's journals take the fast path
        assert got.schema == expected.schema
        assert got.to_pylist() == expected.to_pylist()
        assert jobs.totals_of_journal(path, date_from, date_to).to_pylist() == expected.to_pylist()


def _luhn(digits: str) -> int:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return (10 - total % 10) % 10


def _journal(tmp_path):
    node = init_demo_node(str(tmp_path / "node"), 10, business_date=BD, txn_retention_count=1 << 12)
    try:
        for i, (pan, term) in enumerate(((PANS[0], "T0000001"), (PANS[1], "T0000001"), (PANS[2], "T0000003"))):
            node.apply_and_append(medical(node.engine, KEYS, pan, term, 500000 + i, 0, 0, 0, 500000 + i, stan=10 + i))
        return node.journal.read(), node.engine.config
    finally:
        node.close()


def test_scan_example(tmp_path):
    records, config = _journal(tmp_path)
    scan, got = scan_totals(records, config, BD, BD)
    assert scan.fallback_reason is None
    assert got.to_pylist() == sql_totals(records, config, BD, BD).to_pylist()
    assert [(r["clearing_type"], r["clearing_agency"], r["settlement_count"]) for r in got.to_pylist()] == \
        [("cross-region", 310000, 1), ("local", 110000, 1), ("local", 310000, 1)]
    assert jobs.totals_of(records, config, BD, BD - 1).num_rows == 0                     # empty range


def test_untrusted_order_falls_back_to_the_sql_answer(tmp_path):
    """Settlements moved ahead of the genesis ISSUE records: the SQL's card table is the final
    one, the scan cannot know it, so it says why and totals_of answers with the SQL path."""
    records, config = _journal(tmp_path)
    reordered = np.concatenate([records[-3:], records[:-3]])
    scan, got = scan_totals(reordered, config, BD, BD)
    assert got is None and scan.fallback_reason == "a settlement on a slot not yet issued (or a replacement from one)"
    assert jobs.totals_of(reordered, config, BD, BD).to_pylist() == sql_totals(reordered, config, BD, BD).to_pylist()
    # RRNs out of order: a settlement repeated at the end with an earlier RRN
    again = np.concatenate([records, records[-3:-2]])
    scan, got = scan_totals(again, config, BD, BD)
    assert got is None and scan.fallback_reason == "RRNs not increasing through the journal"
    assert jobs.totals_of(again, config, BD, BD).to_pylist() == sql_totals(again, config, BD, BD).to_pylist()


def test_feed_rejects_a_partial_record(tmp_path):
    records, config = _journal(tmp_path)
    scan = jobs.totals_scan(records.shape[0], config, BD, BD)
    try:
        scan.feed(records.view(np.uint8)[:-1])
    except ValueError as e:
        assert str(e) == f"records: {records.nbytes - 1} bytes, not a multiple of the 304-byte record"
    else:
        raise AssertionError("a partial record was accepted")
