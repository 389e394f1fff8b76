"""`yikatong serve` as a real subprocess on port 0, on a real LMDB data directory, for the
integration tests of protocols/server.py. Clients are the independent bench/baseline client.

    with ServerProcess(tmp_path / "node", loop="uvloop") as srv:
        t = srv.terminal("T0000001", "H11000000000001")
        t.sign_on()
"""
import itertools
import os
import pathlib
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from bench.baseline import client as cl

REPO = pathlib.Path(__file__).resolve().parents[2]
YIKATONG = [sys.executable, "-m", "yikatong.main"]
START_TIMEOUT_S = 60.0


def raise_fd_limit(want: int = 8192) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def yikatong_cmd() -> list:
    exe = pathlib.Path(sys.executable).with_name("yikatong")
    return [str(exe)] if exe.exists() else YIKATONG


class ServerProcess:
    """One `yikatong serve` child. Its stderr (JSON log lines) goes to `log_path`."""

    _stan_blocks = itertools.count(1)

    def __init__(self, data_dir, *, loop: str = "uvloop", demo: bool = True, cards: int = 1000,
                 config: str | None = None, metrics: bool = False, extra_args=()):
        self.data_dir = str(data_dir)
        self.loop = loop
        self.log_path = self.data_dir.rstrip("/") + f".{loop}.{os.getpid()}.{time.monotonic_ns()}.log"
        cmd = yikatong_cmd() + ["serve", "--data", self.data_dir, "--port", "0", "--loop", loop]
        if demo:
            cmd += ["--demo", "--cards", str(cards)]
        if config:
            cmd += ["--config", config]
        cmd += ["--metrics-port", "-1" if metrics else "0"]
        cmd += list(extra_args)
        raise_fd_limit()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.host, self.port, self.metrics_port = "127.0.0.1", None, None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.wait()}) before listening:\n{self.log()[-3000:]}")
            m = re.fullmatch(r"metrics on (\S+):(\d+)\n", line)
            if m:
                self.metrics_port = int(m.group(2))
                continue
            m = re.fullmatch(r"listening on (\S+):(\d+)\n", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
        else:
            self.proc.kill()
            raise RuntimeError("server did not print `listening on` in time")

    # --- helpers --------------------------------------------------------------------------------
    @property
    def address(self):
        return self.host, self.port

    def log(self) -> str:
        self._log.flush()
        return pathlib.Path(self.log_path).read_text(errors="replace")

    def terminal(self, tid: str, mid: str, mac_alg: str = "x9.19", **kw) -> cl.Terminal:
        """A client terminal whose STANs never collide with another test's on this server (the
        idempotency key includes 41 + 11, so reusing STANs would replay old answers)."""
        kw.setdefault("stan_start", next(self._stan_blocks) * 1000)
        kw.setdefault("timeout_s", 30.0)
        return cl.Terminal(self.host, self.port, tid, mid, cl.DEMO_TMK, mac_alg, **kw)

    def connect(self, timeout_s: float = 10.0) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout_s)

    def metrics(self) -> str:
        assert self.metrics_port, "start the server with metrics=True"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200
            return r.read().decode()

    def metric(self, name_and_labels: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(name_and_labels + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    # --- lifecycle ------------------------------------------------------------------------------
    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait(30.0)

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


def run_yikatong(*args, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(yikatong_cmd() + list(args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONPATH": str(REPO)})
