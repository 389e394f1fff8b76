"""The hot path has no Python per message: in `cython -a` of engine/_core.pyx every line of every
`noexcept nogil` function is white (score 0: no Python C-API call)."""
import html
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def annotate(tmp_path) -> list[tuple[int, str]]:
    cython = shutil.which("cython", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("cython")
    if cython is None:
        pytest.fail("cython is not installed in this environment (it is a build requirement)")
    out = tmp_path / "_core.c"
    subprocess.run([cython, "-3", "-a", "-I", str(ROOT / "build" / "cython-include"),
                    str(ROOT / "engine" / "_core.pyx"), "-o", str(out)], check=True, capture_output=True)
    page = (tmp_path / "_core.html").read_text()
    rows = re.findall(r'<pre class="cython line score-(\d+)"[^>]*>(.*?)</pre>', page, re.S)
    return [(int(score), re.sub(r"<[^>]+>", "", html.unescape(text))) for score, text in rows]


def nogil_function_lines(rows):
    """(function header, line) for every line that belongs to a `noexcept nogil` function."""
    inside, header, pending = False, "", None
    for score, text in rows:
        code = re.sub(r"^\+?\s*\d+:\s?", "", text)
        starts = re.match(r"(cdef|def|cpdef)\b", code)
        if starts:
            pending = code
            inside = False
        elif pending is not None:
            pending += " " + code.strip()
        if pending is not None and pending.rstrip().endswith(":"):
            inside = "nogil" in pending and pending.startswith("cdef")
            header, pending = pending, None
            continue
        if inside and code and not code[0].isspace() and not code.startswith("#"):
            inside = False                      # dedent: the function ended
        if inside:
            yield header, score, code


def test_hot_loop_is_white(tmp_path):
    rows = annotate(tmp_path)
    lines = list(nogil_function_lines(rows))
    functions = {h.split("(")[0] for h, _, _ in lines}
    # the loop and everything it calls per message
    for name in ("cdef int apply_rows", "cdef uint16_t apply_one", "cdef uint16_t apply_checked",
                 "cdef uint16_t cmd_medical", "cdef uint16_t cmd_reversal", "cdef uint16_t cmd_undo"):
        assert name in functions, f"{name} not found among the nogil functions"
    yellow = [(h.split("(")[0], code.strip()) for h, score, code in lines if score > 0]
    assert yellow == [], yellow
    assert len(lines) > 400
