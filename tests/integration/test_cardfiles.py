"""Issuance, 代发 and 划入 files against a real node (LMDB in a temp dir): every kind of bad line gets
its own error and nothing else is affected; each file is idempotent."""
import subprocess
import sys

import pytest

from yikatong.cardfiles import FileFormatError, HolderNames, allocate, disburse, import_issuance
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import citizen_check_char, generated_pans
from yikatong.engine.state import saved_arrays
from yikatong.ledger.node import Node
from yikatong.ledger.verify import verify
from yikatong.nodes import init_demo_node

BD = 20261124
KEYS = CardKeys(DEMO_DATA_KEY)
HEADER = "citizen_id,name,region,ins_type,person_type,pan,expiry_yymm,ins_opening_fen,fin_opening_fen\n"


def cid(body17: str) -> str:
    return body17 + citizen_check_char(body17)


def pan(k: int) -> str:
    return generated_pans(k, 1).tobytes().decode()


@pytest.fixture
def node(tmp_path):
    n = init_demo_node(str(tmp_path / "node"), 10, business_date=BD, txn_retention_count=1 << 12)
    yield n
    n.close()


def issuance_file() -> str:
    good1 = f"{cid('11010119900101001')},张三,110000,310,in_service,{pan(5001)},3012,30000,100000\n"
    good2 = f"{cid('31010119910202002')},李四,310000,310,retired,{pan(5002)},3012,0,0\n"
    bad_check = f"{cid('11010119900101003')[:17]}0,王五,110000,310,in_service,{pan(5003)},3012,0,0\n"
    bad_luhn = f"{cid('11010119900101004')},赵六,110000,310,in_service,{pan(5004)[:-1]}0,3012,0,0\n"
    negative = f"{cid('11010119900101005')},钱七,110000,310,in_service,{pan(5005)},3012,-5,0\n"
    non_numeric = f"{cid('11010119900101006')},孙八,110000,310,in_service,{pan(5006)},3012,12.50,0\n"
    unknown_region = f"{cid('11010119900101007')},周九,440000,310,in_service,{pan(5007)},3012,0,0\n"
    duplicated = good1.replace("张三", "张三")
    same_person = f"{cid('11010519650312001')},吴十,110000,310,in_service,{pan(5008)},3012,0,0\n"  # …0017's holder
    short = f"{cid('11010119900101009')},郑一,110000,310\n"
    chinese_region = f"{cid('11010119900101010')},冯二,北京,310,in_service,{pan(5010)},3012,0,0\n"
    return (HEADER + good1 + good2 + bad_check + bad_luhn + negative + non_numeric + unknown_region + duplicated
            + same_person + short + chinese_region)


def test_issuance_every_bad_line_and_idempotence(node):
    data = issuance_file().encode()
    report = import_issuance(node, KEYS, data, "utf-8", BD)
    assert {e.line: e.reason for e in report.errors} == {
        4: "社会保障号码 check character is wrong (GB 11643)",
        5: f"PAN …{(pan(5004)[:-1] + '0')[-4:]}: Luhn check digit is wrong",
        6: "ins_opening_fen must be a non-negative whole number of fen",
        7: "ins_opening_fen must be a non-negative whole number of fen",
        8: "region is not configured on this node",
        9: f"duplicated line: PAN …{pan(5001)[-4:]} already on line 2",
        10: "the person already has a live card (一人一卡)",
        11: "4 fields, expecting 9",
        12: "region is not configured on this node",
    }
    assert report.counts["imported"] == 2
    slot = node.engine.slot_of(KEYS.pan_hash(pan(5001)))
    assert node.engine.balances(slot) == (30000, 100000)
    seq = node.journal.last_seq
    again = import_issuance(node, KEYS, data, "utf-8", BD)
    assert again.counts.get("imported", 0) == 0 and again.counts["already present"] == 2
    assert node.engine.balances(slot) == (30000, 100000)
    assert node.journal.last_seq == seq + 3           # journaled, but changed nothing
    for e in report.errors:                           # no card data in an error
        assert pan(5001) not in e.reason and "110101199001010" not in e.reason


def test_issuance_in_chunks_answers_as_one_pass(tmp_path, monkeypatch):
    """The file is parsed a chunk ahead of the chunk being journaled (cardfiles._line_chunks):
    with chunks of 3, 6, 8, 8… lines the report, the cards and the journal are those of one pass,
    and a PAN repeated across chunks is refused with the line of its first good occurrence."""
    import numpy as np
    import yikatong.cardfiles as cardfiles
    extra = [f"{cid(f'1101011990010{k:04d}')},陈{k},110000,310,in_service,{pan(6000 + k)},3012,{k},0\n"
             for k in range(20)]
    first_good = issuance_file().splitlines(keepends=True)[1]            # line 2: PAN 5001
    lines = (issuance_file() + "".join(extra[:10]) + first_good + "".join(extra[10:15]) + extra[3]
             + extra[12] + extra[12] + "".join(extra[15:]))
    data = lines.encode()
    reports, nodes = [], []
    for name, first, most in (("whole", 1 << 18, 1 << 22), ("chunks", 3, 8)):
        monkeypatch.setattr(cardfiles, "ISSUE_CHUNK_LINES_FIRST", first)
        monkeypatch.setattr(cardfiles, "ISSUE_CHUNK_LINES_MAX", most)
        assert len(cardfiles._line_chunks(data.count(b"\n") - 1)) == (1 if name == "whole" else 6)
        n = init_demo_node(str(tmp_path / name), 10, business_date=BD, txn_retention_count=1 << 12)
        reports.append(import_issuance(n, KEYS, data, "utf-8", BD))
        nodes.append(n)
    whole, chunked = reports
    assert chunked.counts == whole.counts == {"imported": 22, "refused: bad line": 12,
                                              "refused: the person has a live card (一人一卡)": 1}
    assert [(e.line, e.reason) for e in chunked.errors] == [(e.line, e.reason) for e in whole.errors]
    by_line = {e.line: e.reason for e in chunked.errors}
    assert by_line[23] == f"duplicated line: PAN …{pan(5001)[-4:]} already on line 2"       # across chunks
    assert by_line[29] == f"duplicated line: PAN …{pan(6003)[-4:]} already on line 16"
    assert by_line[30] == by_line[31] == f"duplicated line: PAN …{pan(6012)[-4:]} already on line 26"
    a, b = (n.engine.arrays["cards"][:n.engine.card_count] for n in nodes)
    assert np.array_equal(a, b) and nodes[0].journal.last_seq == nodes[1].journal.last_seq
    for n in nodes:
        n.close()


def test_wrong_encoding_and_header(node):
    gbk = issuance_file().encode("gbk")
    with pytest.raises(FileFormatError, match="not valid utf-8 .* give --encoding gbk"):
        import_issuance(node, KEYS, gbk, "utf-8", BD)
    assert import_issuance(node, KEYS, gbk, "gbk", BD).counts["imported"] == 2
    with pytest.raises(FileFormatError, match="header: expecting citizen_id,name"):
        import_issuance(node, KEYS, b"a,b\n1,2\n", "utf-8", BD)


def test_disbursement_result_file_and_idempotence(node):
    lines = ("batch_no,line,id,name,amount_fen,purpose\n"
             "B1,1,110105196503120013,张三,150000,pension\n"            # by 社会保障号码 (…0017's holder)
             "B1,2,6214830000000025,李四,20000,subsidy\n"               # by PAN
             "B1,3,6214830000000058,王五,10000,pension\n"               # formally lost
             "B1,4,6214830000000066,赵六,10000,pension\n"               # cancelled
             "B1,5,110105199901010011,无名,10000,pension\n"             # unknown person (valid number)
             "B1,6,6214830000000025,李四,-1,subsidy\n"                  # negative
             "B1,7,6214830000000025,李四,100,bonus\n"                   # unknown purpose
             "B1,2,6214830000000025,李四,20000,subsidy\n")              # duplicated (batch, line)
    lines = lines.replace("110105199901010011", cid("11010519990101001"))
    data = lines.encode()
    report = disburse(node, KEYS, data, "utf-8", BD)
    rows = report.rows
    assert [(r[1], r[3], r[4]) for r in rows] == [
        ("6", "failed", "amount_fen must be a non-negative whole number of fen"),
        ("7", "failed", "purpose must be one of pension, unemployment, maternity, subsidy"),
        ("2", "failed", "duplicated line: batch B1 line 2 already on file line 3"),
        ("1", "success", ""), ("2", "success", ""),
        ("3", "failed", "card lost (挂失)"), ("4", "failed", "card cancelled or not activated (注销/未激活)"),
        ("5", "failed", "unknown person or card (查无此人)"),
    ]
    assert report.counts["credited_fen"] == 170000
    s17 = node.engine.slot_of(KEYS.pan_hash("6214830000000017"))
    assert node.engine.balances(s17) == (200000, 2150000)
    again = disburse(node, KEYS, data, "utf-8", BD)
    assert again.rows == rows                          # the same 回盘
    assert "credited" not in again.counts and again.counts["already credited (same batch and line)"] == 2
    assert node.engine.balances(s17) == (200000, 2150000)


def test_allocation_rules_and_idempotence(node):
    data = ("citizen_id,period,source,person_type,contribution_base_fen,employee_contribution_fen\n"
            "110105196503120013,202611,EMP01,in_service,1000000,30000\n"      # capped at 2% = 20000
            "310104195201010034,202611,EMP02,retired,0,0\n"                  # retired: region's fixed amount
            "110105196503120013,202611,EMP01,in_service,1000000,30000\n"      # duplicated
            "110105196503120013,202613,EMP01,in_service,1000000,30000\n").encode()
    report = allocate(node, KEYS, data, "utf-8", BD, {310000: 12000})
    assert {e.line: e.reason for e in report.errors} == {
        4: "duplicated line: same person, period and source as line 2", 5: "period must be YYYYMM"}
    assert report.counts["allocated_fen"] == 32000
    s17 = node.engine.slot_of(KEYS.pan_hash("6214830000000017"))
    s33 = node.engine.slot_of(KEYS.pan_hash("6214830000000033"))
    assert node.engine.balances(s17)[0] == 220000 and node.engine.balances(s33)[0] == 212000
    again = allocate(node, KEYS, data, "utf-8", BD, {310000: 12000})
    assert again.counts["already allocated"] == 2 and "allocated" not in again.counts
    assert node.engine.balances(s17)[0] == 220000


def test_cli_import_then_verify(tmp_path):
    data_dir = str(tmp_path / "cli")
    init_demo_node(data_dir, 10, business_date=BD, txn_retention_count=1 << 12).close()
    path = tmp_path / "cards.csv"
    path.write_text(issuance_file(), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "yikatong.main", "cards", "import", str(path), "--data", data_dir,
                          "--date", str(BD)], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr                       # some lines had errors
    assert "imported: 2" in out.stdout and "9 line(s) with errors" in out.stdout
    assert (tmp_path / "cards.csv.errors.csv").read_text().splitlines()[1].startswith("4,")
    assert verify(data_dir)["records"] > 0


HOLDERS = (HEADER + "110105196503120013,张三,110000,310,in_service,6214830000000017,3012,0,0\n"
           + f"{cid('31010119910202002')},李四,310000,310,retired,6214830000000025,3012,0,0\n")


def test_disbursement_name_mismatch_against_the_issuance_data(node):
    """户名不符: the name of a 代发 line is checked against the holder's name in the issuance data
    (by PAN, or by 社会保障号码); a mismatched line credits nothing and says why in the 回盘."""
    holders = HolderNames.from_files(node.engine.config, KEYS, [(HOLDERS.encode(), "utf-8")])
    data = ("batch_no,line,id,name,amount_fen,purpose\n"
            "B9,1,110105196503120013,张三,1000,pension\n"         # by person, right name
            "B9,2,110105196503120013,张四,1000,pension\n"         # by person, wrong name
            "B9,3,6214830000000025,李四,2000,subsidy\n"           # by PAN, right name
            "B9,4,6214830000000025, 李斯 ,2000,subsidy\n"         # by PAN, wrong name (trimmed)
            "B9,5,6214830000000033,王五,3000,pension\n"           # not in the issuance data: not checked
            "B9,6,6214830000000017,Zhang San,100,pension\n").encode()   # 0017 is 张三's card
    s17 = node.engine.slot_of(KEYS.pan_hash("6214830000000017"))
    before, seq = node.engine.balances(s17), node.journal.last_seq
    report = disburse(node, KEYS, data, "utf-8", BD, holders=holders)
    assert report.rows == [
        ("B9", "1", "1000", "success", ""), ("B9", "2", "1000", "failed", "name mismatch (户名不符)"),
        ("B9", "3", "2000", "success", ""), ("B9", "4", "2000", "failed", "name mismatch (户名不符)"),
        ("B9", "5", "3000", "success", ""), ("B9", "6", "100", "failed", "name mismatch (户名不符)"),
    ]
    assert report.counts == {"credited": 3, "credited_fen": 6000, "failed: name mismatch (户名不符)": 3}
    assert node.engine.balances(s17) == (before[0], before[1] + 1000)
    assert node.journal.last_seq == seq + 3                  # the mismatched lines never reach the engine
    assert report.result_csv.decode().splitlines()[2] == "B9,2,1000,failed,name mismatch (户名不符)"
    # without the issuance data the names are not checked (as before)
    again = disburse(node, KEYS, data.replace(b"B9,", b"B8,"), "utf-8", BD)
    assert again.counts == {"credited": 6, "credited_fen": 9100}


def test_cli_disburse_with_holders(tmp_path):
    data_dir = str(tmp_path / "cli")
    init_demo_node(data_dir, 10, business_date=BD, txn_retention_count=1 << 12).close()
    (tmp_path / "cards.csv").write_text(HOLDERS, encoding="utf-8")
    (tmp_path / "pay.csv").write_text("batch_no,line,id,name,amount_fen,purpose\n"
                                      "B1,1,6214830000000025,李四,2000,subsidy\n"
                                      "B1,2,6214830000000025,李斯,2000,subsidy\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "yikatong.main", "disburse", str(tmp_path / "pay.csv"),
                          "--data", data_dir, "--date", str(BD), "--holders", str(tmp_path / "cards.csv")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "failed: name mismatch (户名不符): 1" in out.stdout
    assert (tmp_path / "pay.csv.result.csv").read_bytes() == (
        "batch_no,line,amount_fen,result,reason\r\nB1,1,2000,success,\r\n"
        "B1,2,2000,failed,name mismatch (户名不符)\r\n").encode()


def test_import_beyond_capacity_is_journaled_and_the_node_restarts(tmp_path):
    """A card import that needs more room than the node was created with grows the card columns
    through the journal (a KIND_CAPACITY record): the node restarts with no checkpoint since
    (recovery replays the growth, then the issuances: before, they answered 96 on replay and
    the node refused to start), `verify` from genesis passes, and on a node that checkpoints by
    replay a background checkpoint after it is made by the replica (no copy), byte for byte
    the live state."""
    from yikatong.ledger.records import KIND_CAPACITY
    path = str(tmp_path / "node")
    node = init_demo_node(path, 10, business_date=BD, txn_retention_count=1 << 12, spare_cards=1,
                          checkpoint_by="replay")
    before = node.engine.card_capacity
    assert node.engine.card_count == before - 1                      # room for one more card only
    report = import_issuance(node, KEYS, issuance_file().encode(), "utf-8", BD)
    assert report.counts["imported"] == 2
    assert node.engine.card_capacity == 2 * before                   # grown (at least doubled)
    grown_at = [int(r["seq"]) for r in node.journal.read() if r["record_kind"] == KIND_CAPACITY]
    assert len(grown_at) == 1
    live = {name: a.tobytes() for name, a in node.engine.arrays.items()}
    node.close()
    node = Node.open(path)
    try:
        assert node.checkpoint_seq == 0                               # recovered from genesis
        assert {name: a.tobytes() for name, a in node.engine.arrays.items()} == live
        # a checkpoint holds every array but the derived ones (rebuilt when loaded)
        at = {name: a.tobytes() for name, a in saved_arrays(node.engine.arrays).items()}
        npz = node.checkpoint(background=True)
        node._checkpoint_thread.join()
        assert node.checkpoint_stats == {"by_replay": 1, "by_copy": 0, "failed": 0,
                                         "replayed_records": node.journal.last_seq}
        from yikatong.ledger.node import load_npz
        assert {name: a.tobytes() for name, a in load_npz(npz).items()} == at
    finally:
        node.close()
    result = verify(path)
    assert (result["capacity_changes"], result["checkpoints"]) == (1, 1)
