"""A small terminal progress bar (stderr), with rate and ETA; silent when not a terminal."""
import sys
import time


class Progress:
    def __init__(self, total: int, label: str, unit: str = "msg", stream=sys.stderr, width: int = 30):
        self.total, self.label, self.unit, self.stream, self.width = total, label, unit, stream, width
        self.done = 0
        self.start = time.perf_counter()
        self.tty = stream.isatty()

    def update(self, count: int):
        self.done += count
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        filled = int(self.width * self.done / max(self.total, 1))
        line = (f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done:,}/{self.total:,} {self.unit} {rate:,.0f}/s")
        if self.tty:
            self.stream.write(line)
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
        elapsed = time.perf_counter() - self.start
        return self.done, elapsed
