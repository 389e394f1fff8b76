"""Every tunable of the terminal server, in one place, each with its unit and default: the TOML
file `yikatong serve --config FILE` reads decodes straight into ServerConfig (msgspec: a wrong
type or an unknown key is an error naming the key, never echoing a value).

    [server]
    host = "127.0.0.1"
    port = 8583
    loop = "uvloop"                 # or "asyncio"
    metrics_port = 0                # Prometheus text on 127.0.0.1:PORT/metrics; 0 = off, -1 = any free port
    cutover_time = "00:00"          # 日切: daily cutover at this local time; "" = only by command

    [limits]
    frame_bytes_max = 2048
    ...
"""
from typing import Literal

import msgspec


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """Bounds on everything a peer can make the server hold (DESIGN.md §5)."""
    frame_bytes_max: int = 2048              # bytes after the length prefix; larger declared → close
    batch_size_max: int = 4096               # messages per engine batch (and per group commit)
    inflight_per_connection_max: int = 256   # frames read but not yet answered; above → stop reading
    connections_max: int = 4096              # accepted at once; more are closed on accept
    idle_timeout_ms: int = 300_000           # a connection with no frame for this long is closed
    partial_frame_timeout_ms: int = 10_000   # a frame begun but not finished for this long → close
    write_buffer_high_bytes: int = 1 << 20   # replies queued to a slow reader; above → stop reading it
    batch_linger_us: int = 1000              # with batches waiting for the disk, gather new frames this long (0 = off)
    batches_in_flight_max: int = 8           # batches applied, not yet durable (the writer commits the queued ones together)
    drain_timeout_ms: int = 30_000           # SIGTERM: in-flight batches must commit within this

    def check(self):
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value < 0 or (value == 0 and name != "batch_linger_us"):
                raise ValueError(f"limits.{name}: expecting a positive number")
        if not 21 <= self.frame_bytes_max <= 65535:
            raise ValueError("limits.frame_bytes_max: expecting 21..65535 (the length prefix is 2 bytes)")
        if self.batches_in_flight_max > 32:
            raise ValueError("limits.batches_in_flight_max: expecting at most 32 (the writer's group)")
        return self


class ServerSection(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8583                          # 0 = any free port (printed in the `listening on` line)
    loop: Literal["uvloop", "asyncio"] = "uvloop"
    metrics_port: int = 0                     # 0 = no metrics endpoint; -1 = any free port (printed)
    cutover_time: str = ""                    # "HH:MM" local time of the daily cutover (日切); "" = none
    log_json: bool = True                     # structured logs: one JSON object per line on stderr


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    limits: Limits = msgspec.field(default_factory=Limits)


def load_config(path: str | None) -> ServerConfig:
    if not path:
        config = ServerConfig()
    else:
        with open(path, "rb") as f:
            config = msgspec.toml.decode(f.read(), type=ServerConfig)
    config.limits.check()
    if config.server.cutover_time:
        hh, _, mm = config.server.cutover_time.partition(":")
        if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
            raise ValueError("server.cutover_time: expecting HH:MM")
    return config
