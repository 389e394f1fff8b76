"""The daily report renders in headless Chromium (Debian's `chromium`, installed by
tools/install-chromium.sh from `make test`): a screenshot is made and the key totals are on the page;
terminal batch totals count what an 0500 compares."""
import os
import shutil
import subprocess
import sys

import pytest

from yikatong.engine import Cmd
from yikatong.engine.builders import medical, request
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.ledger import jobs
from yikatong.ledger.report import render
from yikatong.nodes import init_demo_node

KEYS = CardKeys(DEMO_DATA_KEY)
BD = 20261124


@pytest.fixture
def day(tmp_path):
    path = str(tmp_path / "node")
    node = init_demo_node(path, 10, business_date=BD, txn_retention_count=1 << 12)
    try:
        node.apply_and_append(medical(node.engine, KEYS, "6214830000000025", "T0000001", 5000000, 300000, 50000,
                                      100000, 4550000, local_time=93000))
        node.apply_and_append(medical(node.engine, KEYS, "6214830000000017", "T0000001", 5000000, 300000, 50000,
                                      100000, 4550000, local_time=101500))
        p = node.apply_and_append(request(node.engine, KEYS, Cmd.PURCHASE, pan="6214830000000033", terminal="T0000006",
                                          amount_fen=12345, pin="888888", local_time=101600))[0]
        node.apply_and_append(request(node.engine, KEYS, Cmd.PURCHASE, pan="6214830000000033", terminal="T0000006",
                                      amount_fen=500, pin="888888"))
        node.apply_and_append(request(node.engine, KEYS, Cmd.VOID, pan="6214830000000033", terminal="T0000006",
                                      amount_fen=12345, orig_rrn=int(p["rrn"])))
        node.apply_and_append(request(node.engine, KEYS, Cmd.DEPOSIT, pan="6214830000000033", terminal="T0000005",
                                      amount_fen=7000))
        records = node.journal.read()
        con = jobs.connect(jobs.flatten(records), jobs.dimensions(node.engine.config, records))
    finally:
        node.close()
    return con, path


def test_terminal_batch_totals(day):
    con, _ = day
    rows = jobs.terminal_batches(con, BD).to_pylist()
    assert rows == [
        {"terminal_id": "T0000001", "batch_no": 1, "debit_fen": 10000000, "debit_count": 2, "credit_fen": 0, "credit_count": 0},
        {"terminal_id": "T0000005", "batch_no": 1, "debit_fen": 0, "debit_count": 0, "credit_fen": 7000, "credit_count": 1},
        {"terminal_id": "T0000006", "batch_no": 1, "debit_fen": 500, "debit_count": 1, "credit_fen": 0, "credit_count": 0},
    ]                                                       # the voided purchase counts in neither


def test_report_renders_in_chromium(day, tmp_path):
    con, _ = day
    page = render(con, BD)
    assert 'id="settlement-count">2<' in page and "100,000.00" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    out = tmp_path / "report.html"
    out.write_text(page, encoding="utf-8")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (tools/install-chromium.sh installs it as root)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,1800", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    assert open(shot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([chromium, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="settlement-count">2</b>' in dom
    assert 'id="settlement-amount">100,000.00</b>' in dom
    assert "37,400.00" in dom                              # the Shanghai card's fund in the clearing heatmap
