"""The writer's shared ring (ledger/writer.py): batches placed in the ring, wrapping around it,
and batches the ring cannot take (too large, or it is full of unacknowledged batches) sent
through the pipe instead — the journal holds exactly the records submitted, in order, chained."""
import os
import subprocess
import sys

import numpy as np

from yikatong.ledger import writer
from yikatong.ledger.journal import Journal, batch_hash
from yikatong.ledger.records import RECORD_DTYPE

BD = 20261124
SIZE = RECORD_DTYPE.itemsize


def batch(first_seq: int, count: int, rng) -> np.ndarray:
    records = np.frombuffer(rng.integers(0, 256, count * SIZE, dtype=np.uint8).tobytes(), RECORD_DTYPE).copy()
    records["seq"] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
    return records


def test_ring_wraps_and_falls_back_to_the_pipe(tmp_path):
    rng = np.random.default_rng(11)
    journal = Journal(str(tmp_path), create=True)
    journal.ring_size_bytes = 1000 * SIZE                  # a small ring: it wraps and fills up
    journal.start_writer()
    sent, tickets, placed, piped = [], [], 0, 0
    # sizes: many that fit, some that wrap, one larger than the ring (always the pipe)
    for k, count in enumerate([300, 300, 300, 300, 50, 700, 1, 999, 1000, 1200, 400, 400, 400, 400, 5] * 3):
        records = batch(journal.last_seq + 1, count, rng)
        in_place = journal.ring_records(count) if k % 2 else None     # built where the writer reads
        if in_place is not None:
            in_place[:] = records
        tickets.append(journal.submit(records if in_place is None else in_place, BD))
        if journal._ring_regions and journal._ring_regions[-1][0] == tickets[-1]:
            placed += 1
        else:
            piped += 1
        sent.append(records.copy())
        if k % 3 == 2:                                       # sometimes wait: regions free up
            journal.wait_durable(tickets[-2])
        # no region overlaps another unacknowledged one
        live = sorted((start, end) for ticket, start, end in journal._ring_regions if ticket > journal.acked_batch_no)
        assert all(a[1] <= b[0] for a, b in zip(live, live[1:])) and all(end <= 1000 * SIZE for _, end in live)
    journal.wait_durable(tickets[-1])
    assert placed > 20 and piped >= 3                        # both paths were taken
    journal.close()

    reader = Journal(str(tmp_path), readonly=True)
    expected = np.concatenate(sent)
    assert reader.read().tobytes() == expected.tobytes()
    prev = bytes(32)
    headers = reader.headers()
    assert headers.shape[0] == len(sent)
    for header, records in zip(headers, sent):
        assert bytes(header["prev_hash"]) == prev
        prev = batch_hash(prev, records.tobytes())
        assert bytes(header["hash"]) == prev
    reader.close()


def test_close_while_a_ring_view_is_held(tmp_path):
    journal = Journal(str(tmp_path), create=True)
    journal.start_writer()
    view = journal.ring_records(3)
    view[:] = batch(1, 3, np.random.default_rng(2))
    journal.wait_durable(journal.submit(view, BD))
    journal.close()                                          # no BufferError: the mapping goes with the view
    reader = Journal(str(tmp_path), readonly=True)
    assert reader.read().tobytes() == view.tobytes()
    reader.close()


def test_writer_fails_the_next_batch_when_its_reader_breaks(tmp_path):
    """The node dies in the middle of a message: the writer's reader thread fails (EOFError), and
    the writer answers the next batch with a failure and exits 4 instead of waiting forever."""
    Journal(str(tmp_path), create=True).close()
    proc = subprocess.Popen([sys.executable, "-m", "yikatong.ledger.writer", str(tmp_path / "journal.lmdb"),
                             str(1 << 30), str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    ready = proc.stdout.read(writer.ACK.size + 32)
    assert writer.ACK.unpack(ready[:writer.ACK.size]) == (0, 0, 32)
    proc.stdin.write(writer.MSG.pack(writer.KIND_APPEND, BD, 1, 1, 1, 0)[:10])     # 10 of 40 bytes
    proc.stdin.close()
    bno, status, length = writer.ACK.unpack(proc.stdout.read(writer.ACK.size))
    message = proc.stdout.read(length).decode()
    assert (bno, status) == (1, 1)
    assert message == ("reading or hashing batch 1 failed (EOFError: pipe closed after 10 of 40 bytes); "
                       "the node stops (fail-stop)")
    assert proc.wait(timeout=30) == 4
