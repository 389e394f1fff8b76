"""The Cython core of the card files (yikatong._cardfiles) against obviously-correct Python: the
UTF-8 check, the line split, the request rows of issuance and 代发 lines, the 回盘 CSV."""
import csv
import io

import numpy as np
import pytest

from yikatong import _cardfiles
from yikatong.cardfiles import FILE_KEY
from yikatong.engine import REQUEST_DTYPE, Cmd, CardStatus, CardFlag, _core
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import citizen_check_char

KEYS = CardKeys(DEMO_DATA_KEY)
CID = "11010519650312001" + citizen_check_char("11010519650312001")     # 110105196503120013
CID_X = "11010119800101007X"                                              # check character X


@pytest.mark.parametrize("data", [
    b"", b"abc", "张三".encode(), b"\xff", b"ab\xe5\xbc", b"abcdefgh\xc0\x80", "张".encode()[:2] + b"x",
    b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"12345678901234567\xe2\x82\xac\xf0\x9f\x98\x80", "a,b\n".encode() * 9 + b"\x80",
])
def test_utf8_error_offset_is_where_python_stops(data):
    try:
        data.decode("utf-8")
        expected = -1
    except UnicodeDecodeError as e:
        expected = e.start
    assert _cardfiles.utf8_error_offset(data) == expected


def test_line_starts():
    assert _cardfiles.line_starts(b"h\na\nbb\n", 2).tolist() == [2, 4, 7]          # 2 lines
    assert _cardfiles.line_starts(b"h\na\nbb", 2).tolist() == [2, 4, 7]            # no last '\n'
    assert _cardfiles.line_starts(b"h\n", 2).tolist() == [2]                       # header only
    assert _cardfiles.line_starts(b"h\n\n\n", 2).tolist() == [2, 3, 4]             # two empty lines


def issuance(text: str):
    data = text.encode()
    starts = _cardfiles.line_starts(data, 0)
    n = starts.size - 1
    status, q = np.empty(n, np.uint8), np.empty(n, REQUEST_DTYPE)
    lines, names = np.empty(n, np.int64), np.empty(n, np.uint64)
    good = _cardfiles.parse_issuance(data, starts, np.array([110000, 310000]), np.array([310, 390]),
                                     KEYS.pan_key, KEYS.person_key, b"k" * 16, CardStatus.ACTIVE,
                                     CardFlag.FIN_ACTIVE, status, q, lines, names)
    return status, q[:good], lines[:good], names[:good]


def test_issuance_request_rows_exact():
    status, q, lines, names = issuance(
        f'{CID},张三,110000,310,in_service,6214830000000017,3012,30000,100000\n'
        f' "{CID_X.lower()}" , 李四 ,310000,390,retired,6214830000000025129,2901,0,999999999999\r\n'
        f'{CID},张三,110000,310,in_service,6214830000000017,3013,0,0\n')
    assert status.tolist() == [0, 0, 9]
    assert lines.tolist() == [0, 1]
    expected = np.zeros(2, REQUEST_DTYPE)
    expected["terminal_index"] = expected["institution_index"] = -1
    expected["cmd"] = Cmd.ISSUE
    expected["pan_hash"] = [KEYS.pan_hash("6214830000000017"), KEYS.pan_hash("6214830000000025129")]
    expected["pan_last4"] = [17, 5129]
    expected["person_hash"] = [KEYS.person_hash(CID), KEYS.person_hash(CID_X)]
    expected["region_code"] = [110000, 310000]
    expected["ins_type"] = [310, 390]
    expected["acct_type"] = [0 | CardFlag.FIN_ACTIVE << 4, 1 | CardFlag.FIN_ACTIVE << 4]
    expected["med_type"] = CardStatus.ACTIVE
    expected["expiry_yymm"] = [3012, 2901]
    expected["amount_fen"] = [30000, 0]
    expected["amount2_fen"] = [100000, 999999999999]
    assert q.tobytes() == expected.tobytes()
    assert names.tolist() == [_core.siphash(b"k" * 16, "张三".encode()), _core.siphash(b"k" * 16, "李四".encode())]


@pytest.mark.parametrize("line, code", [
    ("a,b", 1),
    (f"{CID[:17]},x,110000,310,in_service,6214830000000017,3012,0,0", 2),
    (f"{CID[:17]}1,x,110000,310,in_service,6214830000000017,3012,0,0", 3),
    (f"{CID},x,110000,310,in_service,621483000000001,3012,0,0", 4),
    (f"{CID},x,110000,310,in_service,6214830000000018,3012,0,0", 5),
    (f"{CID},x,440000,310,in_service,6214830000000017,3012,0,0", 6),
    (f"{CID},x,北京,310,in_service,6214830000000017,3012,0,0", 6),
    (f"{CID},x,110000,311,in_service,6214830000000017,3012,0,0", 7),
    (f"{CID},x,110000,310,retire,6214830000000017,3012,0,0", 8),
    (f"{CID},x,110000,310,in_service,6214830000000017,3000,0,0", 9),
    (f"{CID},x,110000,310,in_service,6214830000000017,3012,-1,0", 10),
    (f"{CID},x,110000,310,in_service,6214830000000017,3012,0,1234567890123", 11),
])
def test_issuance_first_broken_rule(line, code):
    assert issuance(line + "\n")[0].tolist() == [code]


def test_disbursement_request_rows_and_result_csv():
    text = ("B1,1,6214830000000017,张三,150000,pension\n"
            f"B1,0002,{CID},张三,7,subsidy\n"
            "B1,3,6214830000000017,张三,150000,bonus\n"
            'B"2,4,6214830000000017,张三,1,pension\n')
    data = text.encode()
    starts = _cardfiles.line_starts(data, 0)
    n = starts.size - 1
    status, q = np.empty(n, np.uint8), np.empty(n, REQUEST_DTYPE)
    lines, by_person, names = np.empty(n, np.int64), np.empty(n, np.uint8), np.empty(0, np.uint64)
    good = _cardfiles.parse_disbursement(data, starts, KEYS.pan_key, KEYS.person_key, FILE_KEY, None,
                                         status, q, lines, by_person, names)
    assert good == 3 and status.tolist() == [0, 0, 21, 0] and lines[:3].tolist() == [0, 1, 3]
    assert by_person[:3].tolist() == [0, 1, 0]
    key = lambda *parts: (_core.siphash(FILE_KEY, b"\x1f".join(parts)) & 0x7FFFFFFFFFFFFFFF) | 1
    q = q[:3]
    assert q["cmd"].tolist() == [Cmd.CREDIT_FIN] * 3
    assert q["pan_hash"].tolist() == [KEYS.pan_hash("6214830000000017"), 0, KEYS.pan_hash("6214830000000017")]
    assert q["person_hash"].tolist() == [0, KEYS.person_hash(CID), 0]
    assert q["amount_fen"].tolist() == [150000, 7, 1]
    assert q["idem_key"].tolist() == [key(b"daifa", b"B1", b"1"), key(b"daifa", b"B1", b"0002"),
                                      key(b"daifa", b'B"2', b"4")]
    assert q["content_hash"].tolist() == [key(b"6214830000000017", b"150000", b"pension"),
                                          key(CID.encode(), b"7", b"subsidy"),
                                          key(b"6214830000000017", b"1", b"pension")]
    reasons = [b"success,", b'failed,"same (batch, line) with other content"']
    out = _cardfiles.result_lines(data, starts, lines[:3], np.array([150000, 7, 1]),
                                  np.array([0, 1, 0], np.uint8), reasons)
    assert out == (b"B1,1,150000,success,\r\n"
                   b'B1,0002,7,failed,"same (batch, line) with other content"\r\n'
                   b'"B""2",4,1,success,\r\n')
    expected = io.StringIO()                     # what Python's csv module writes for the same rows
    csv.writer(expected).writerows([("B1", "1", "150000", "success", ""),
                                    ("B1", "0002", "7", "failed", "same (batch, line) with other content"),
                                    ('B"2', "4", "1", "success", "")])
    assert out == expected.getvalue().encode()


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_parse_in_shares_is_the_one_pass(monkeypatch, threads):
    """The file pass on several threads (cardfiles._parse_in_shares) gives exactly the rows, line
    indexes, statuses and name hashes of one pass, bad lines in any share included."""
    from yikatong import cardfiles
    good_issue = f"{CID},张三,110000,310,in_service,6214830000000017,3012,30000,100000"
    bad_issue = [f"{CID},x,440000,310,in_service,6214830000000017,3012,0,0", "a,b",
                 f"{CID},x,110000,310,in_service,6214830000000018,3012,0,0"]
    lines = [good_issue.replace("3012", f"{3001 + k % 12:04d}") if k % 7 else bad_issue[k % 3] for k in range(40)]
    data = ("\n".join(lines) + "\n").encode()
    starts = _cardfiles.line_starts(data, 0)
    n = starts.size - 1
    regions, types = np.array([110000, 310000]), np.array([310, 390])

    def issuance_parse(starts_, status_, row_line_, q_, names_):
        return _cardfiles.parse_issuance(data, starts_, regions, types, KEYS.pan_key, KEYS.person_key, b"k" * 16,
                                         CardStatus.ACTIVE, CardFlag.FIN_ACTIVE, status_, q_, row_line_, names_)

    def run(parse, rows):
        status, row_line = np.zeros(n, np.uint8), np.zeros(n, np.int64)
        good = cardfiles._parse_in_shares(parse, starts, status, row_line, rows)
        return good, status.tolist(), row_line[:good].tolist(), [r[:good].tobytes() for r in rows]

    monkeypatch.setattr(cardfiles, "PARSE_THREADS", 1)
    one = run(issuance_parse, [np.zeros(n, REQUEST_DTYPE), np.zeros(n, np.uint64)])
    monkeypatch.setattr(cardfiles, "PARSE_THREADS", threads)
    monkeypatch.setattr(cardfiles, "PARSE_LINES_MIN", 4)
    assert run(issuance_parse, [np.zeros(n, REQUEST_DTYPE), np.zeros(n, np.uint64)]) == one
    assert one[0] == 34 and one[1].count(0) == 34

    text = "".join(f"B1,{k},6214830000000017,张三,{k},{'pension' if k % 5 else 'bonus'}\n" for k in range(1, 41))
    data = text.encode()
    starts = _cardfiles.line_starts(data, 0)                 # (40 lines again: n is unchanged)

    def disburse_parse(starts_, status_, row_line_, q_, by_person_, names_):
        return _cardfiles.parse_disbursement(data, starts_, KEYS.pan_key, KEYS.person_key, FILE_KEY, None,
                                             status_, q_, row_line_, by_person_, names_)
    monkeypatch.setattr(cardfiles, "PARSE_THREADS", 1)
    one = run(disburse_parse, [np.zeros(n, REQUEST_DTYPE), np.zeros(n, np.uint8), np.zeros(0, np.uint64)])
    monkeypatch.setattr(cardfiles, "PARSE_THREADS", threads)
    assert run(disburse_parse, [np.zeros(n, REQUEST_DTYPE), np.zeros(n, np.uint8), np.zeros(0, np.uint64)]) == one
    assert one[0] == 32


@pytest.mark.parametrize("fault", [None, "second half", "lead byte before the split", "first half", "no final newline"])
def test_file_lines_in_two_halves_is_the_one_pass(monkeypatch, fault):
    """_file_lines checks and splits a file of ≥ FILE_SPLIT_MIN_BYTES in two halves at once: the
    same line starts, and the same first bad UTF-8 byte, as Python's decoder over the whole."""
    from yikatong import cardfiles
    header = ",".join(cardfiles.ISSUE_COLUMNS) + "\n"
    body = bytearray("".join(f"{k:018d},张{k},110000,310,in_service,{k:016d},3012,0,0\n"
                             for k in range(30_000)).encode())
    mid = body.find(b"\n", len(body) // 2 + len(header) // 2)       # where the split will fall
    if fault == "second half":
        body[len(body) * 3 // 4] = 0xFF
    elif fault == "first half":
        body[len(body) // 4] = 0xC0
    elif fault == "lead byte before the split":
        body[mid - 1] = 0xE5
    elif fault == "no final newline":
        body = body[:-1]
    data = header.encode() + bytes(body)
    try:
        data.decode("utf-8")
        expected_bad = None
    except UnicodeDecodeError as e:
        expected_bad = e.start
    results = []
    for split_min in (1 << 40, 1 << 20):                 # one pass, then two halves
        monkeypatch.setattr(cardfiles, "FILE_SPLIT_MIN_BYTES", split_min)
        try:
            results.append(cardfiles._file_lines(data, "utf-8", cardfiles.ISSUE_COLUMNS)[1])
        except cardfiles.FileFormatError as e:
            results.append(str(e))
    if expected_bad is None:
        starts = [len(header)] + [len(header) + i + 1 for i, c in enumerate(body) if c == 10]
        if starts[-1] != len(data):
            starts.append(len(data) + 1)                 # the last line's virtual '\n'
        assert results[0].tolist() == results[1].tolist() == starts
    else:
        assert results[0] == results[1] == (f"the file is not valid utf-8 (byte {expected_bad}): "
                                            f"give --encoding gbk if that is what it is")
