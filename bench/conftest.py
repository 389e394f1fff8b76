"""Benchmark sizes: YIKATONG_BENCH_SIZE=small (CI, and `make test` runs each bench once) or full."""
import os

import pytest

FULL = os.environ.get("YIKATONG_BENCH_SIZE", "small") == "full"


def size(small: int, full: int) -> int:
    """Pick the CI size or the real one."""
    return full if FULL else small


@pytest.fixture
def bench_size():
    return size
