"""ledger/_mapped.copy_slices: slices copied one after another, byte for byte, on any number of
threads, with plain and streaming copies, share cuts inside slices and at their edges."""
import numpy as np
import pytest

from yikatong.ledger._mapped import copy_slices

MIB = 1 << 20


def slices_of(source: np.ndarray, cuts: list[int]) -> list:
    return [memoryview(source[a:b]) for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("threads", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("total, cuts", [
    (1000, [0, 1, 304, 304, 999, 1000]),                  # small: one memcpy share, an empty slice
    (3 * MIB + 5, [0, MIB, 2 * MIB + 7, 3 * MIB + 5]),    # below the streaming size
    (20 * MIB + 304, [0, 5, 7 * MIB + 1, 7 * MIB + 1, 13 * MIB, 20 * MIB + 304]),  # streaming, shares cut inside slices
    (17 * MIB, [0] + [k * 1216 * 1024 for k in range(1, 14)] + [17 * MIB]),        # batch-sized slices
])
def test_copy_slices_concatenates_exactly(threads, total, cuts):
    rng = np.random.default_rng(total)
    source = rng.integers(0, 256, total, dtype=np.uint8)
    destination = np.full(total + 64, 0xA5, dtype=np.uint8)
    assert copy_slices(destination, slices_of(source, cuts), threads) == total
    assert destination[:total].tobytes() == source.tobytes()
    assert (destination[total:] == 0xA5).all()             # nothing written past the slices


def test_copy_slices_into_an_unaligned_destination():
    source = np.arange(9 * MIB, dtype=np.uint64).view(np.uint8)[:9 * MIB + 3]
    backing = np.zeros(9 * MIB + 16, dtype=np.uint8)
    destination = backing[1:1 + source.shape[0]]           # not 16-byte aligned: plain copies
    assert copy_slices(destination, slices_of(source, [0, 4 * MIB + 1, source.shape[0]]), 2) == source.shape[0]
    assert destination.tobytes() == source.tobytes()


def test_copy_slices_refuses_a_short_destination():
    source = np.ones(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="copy_slices: 100 bytes of slices, the destination holds 99"):
        copy_slices(np.zeros(99, dtype=np.uint8), [memoryview(source)])
    assert copy_slices(np.zeros(0, dtype=np.uint8), []) == 0


@pytest.mark.parametrize("module, prefetches_min, streaming_stores_min", [
    ("yikatong.ledger._mapped", 1, 4), ("yikatong.ledger._totals", 5, 0)])
def test_the_built_extensions_keep_their_prefetches(module, prefetches_min, streaming_stores_min):
    """The figures depend on these instructions (bench/README-ledger.md §2, bench/README.md
    issue 7): a compiler that drops a prefetch it deems free of side effects fails here."""
    import importlib
    import shutil
    import subprocess
    if shutil.which("objdump") is None:
        pytest.skip("objdump not installed")
    path = importlib.import_module(module).__file__
    text = subprocess.run(["objdump", "-d", path], capture_output=True, text=True, check=True).stdout
    assert text.count("prefetch") >= prefetches_min
    assert text.count("movntdq") >= streaming_stores_min
