"""The hot path has no Python per message: in `cython -a` of the per-message modules
(engine/_core.pyx, protocols/_codec.pyx, protocols/_security.pyx, protocols/_client.pyx) every line
of every `noexcept nogil` function and of every `with nogil:` block is white (score 0: no Python
C-API call)."""
import html
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def annotate(tmp_path, source: str = "engine/_core.pyx") -> list[tuple[int, str]]:
    cython = shutil.which("cython", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("cython")
    if cython is None:
        pytest.fail("cython is not installed in this environment (it is a build requirement)")
    stem = pathlib.Path(source).stem
    out = tmp_path / f"{stem}.c"
    subprocess.run([cython, "-3", "-a", "-I", str(ROOT / "build" / "cython-include"),
                    str(ROOT / source), "-o", str(out)], check=True, capture_output=True)
    page = (tmp_path / f"{stem}.html").read_text()
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


def nogil_lines(rows):
    """(where, score, line) for every line of an indented `noexcept nogil` method or function and
    of every `with nogil:` block (indentation decides where each ends)."""
    owner, owner_indent, pending = None, -1, None
    for score, text in rows:
        code = re.sub(r"^\+?\s*\d+:\s?", "", text)
        stripped = code.strip()
        indent = len(code) - len(code.lstrip())
        if owner is not None and stripped and not stripped.startswith("#") and indent <= owner_indent:
            owner = None
        if owner is None:
            if pending is not None:
                pending = (pending[0] + " " + stripped, pending[1])
            elif re.match(r"(cdef|def|cpdef)\b[^=]*\(", stripped) or stripped == "with nogil:":
                pending = (stripped, indent)
            if pending is not None and pending[0].endswith(":"):
                header, at = pending
                pending = None
                if header == "with nogil:" or (header.startswith("cdef") and "nogil" in header):
                    owner, owner_indent = header, at
            continue
        if stripped:
            yield owner, score, stripped


@pytest.mark.parametrize("source, required", [
    ("protocols/_codec.pyx", ("cdef int parse_fields", "cdef int fill_request", "cdef Py_ssize_t encode_reply",
                              "cdef int _medical_tlv", "with nogil:")),
    ("protocols/_security.pyx", ("with nogil:",)),
    ("protocols/_client.pyx", ("with nogil:",)),
])
def test_protocol_hot_paths_are_white(tmp_path, source, required):
    lines = list(nogil_lines(annotate(tmp_path, source)))
    owners = {h.split("(")[0] for h, _, _ in lines}
    for name in required:
        assert name in owners, f"{source}: {name} not found among the nogil code ({sorted(owners)[:20]})"
    yellow = [(h.split("(")[0], code) for h, score, code in lines if score > 0]
    assert yellow == [], yellow
    assert len(lines) > 20


def test_apply_loop_binary_prefetches():
    """The apply loop's software prefetches survive compilation. With `__builtin_prefetch` inside
    small helper functions gcc -O1+ found the helpers free of side effects and deleted their calls,
    so the loop had none (and ran at half speed with 100,000 cards); engine/_core.pyx now uses a
    volatile asm. Checked on the built extension itself."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump is not installed (binutils comes with gcc, which the build needs)")
    from yikatong.engine import _core
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", _core.__file__], check=True,
                             capture_output=True, text=True).stdout
    # idem, reversal and PAN buckets; the evicted entry's two buckets; card, year, payer, PVV
    # rows; the request rows. Inlined (the default -O3 build) each is a prefetcht0; a debug build
    # (YIKATONG_DEBUG=1, -O0) keeps yk_prefetch out of line, so there each is a call to it.
    sites = [line for line in listing.splitlines()
             if "prefetcht0" in line or re.search(r"call\s.*<yk_prefetch>", line)]
    assert len(sites) >= 8, f"{len(sites)} prefetch sites in {_core.__file__}"
