"""yikatong.engine — the domain core: card state, policies, the batch apply loop. No I/O.

    >>> from yikatong.engine import Engine, new_requests
    >>> from yikatong.engine.demo import demo_engine
    >>> engine, cards = demo_engine(generated_cards=0)
    >>> results = engine.apply_batch(requests, business_date=20261124)   # doctest: +SKIP
"""
import logging

import numpy as np

from . import _core
from .config import NodeConfig
from .layouts import (REQUEST_DTYPE, RESULT_DTYPE, TXN_DTYPE, POLICY_DTYPE, Cmd, ReqFlag,
                      ResFlag, CardStatus, CardFlag, InstKind, rc, rc_str, codes_of)
from .state import (new_state, card_arrays, card_bytes, upgrade_arrays, META_CARD_COUNT,
                    META_WARNINGS, META_TXN_COUNT, ConfigError)

log = logging.getLogger("yikatong.engine")

__all__ = ["Engine", "BatchShapeError", "new_requests", "new_results", "REQUEST_DTYPE",
           "RESULT_DTYPE", "Cmd", "ReqFlag", "ResFlag", "CardStatus", "CardFlag", "InstKind",
           "rc", "rc_str", "codes_of", "NodeConfig", "ConfigError"]


class BatchShapeError(TypeError):
    """apply_batch was given an array of the wrong kind (a programmer error at the edge)."""


def new_requests(count: int) -> np.ndarray:
    """A zeroed request array (terminal and institution -1 = none)."""
    requests = np.zeros(count, dtype=REQUEST_DTYPE)
    requests["terminal_index"] = -1
    requests["institution_index"] = -1
    return requests


def new_results(count: int) -> np.ndarray:
    return np.zeros(count, dtype=RESULT_DTYPE)


def _check_array(name: str, array, dtype: np.dtype, writeable: bool):
    if not isinstance(array, np.ndarray):
        raise BatchShapeError(f"{name}: expecting a numpy array of dtype {_dtype_name(dtype)}, "
                              f"found {type(array).__name__}")
    if array.dtype != dtype:
        raise BatchShapeError(f"{name}: expecting dtype {_dtype_name(dtype)} "
                              f"({dtype.itemsize} bytes), found {array.dtype} ({array.dtype.itemsize} bytes)")
    if array.ndim != 1 or not array.flags.c_contiguous:
        raise BatchShapeError(f"{name}: expecting a 1-dimensional C-contiguous array, "
                              f"found shape {array.shape}")
    if writeable and not array.flags.writeable:
        raise BatchShapeError(f"{name}: expecting a writeable array")


def _dtype_name(dtype):
    return {REQUEST_DTYPE: "REQUEST_DTYPE", RESULT_DTYPE: "RESULT_DTYPE"}.get(dtype, str(dtype))


class Engine:
    """The state machine. Owns the numpy arrays (`self.arrays`); `apply_batch` is the only
    way state changes, so a replay of the same requests rebuilds the same arrays."""

    def __init__(self, config: NodeConfig, card_capacity: int = 1024,
                 txn_retention_count: int = 1 << 20, arrays: dict | None = None):
        self.config = config
        self.arrays = (upgrade_arrays(arrays) if arrays is not None
                       else new_state(config, card_capacity, txn_retention_count))
        self.core = _core.Core(self.arrays)
        self.terminal_index = {t.terminal_id: i for i, t in enumerate(config.terminals)}
        self.institution_index = {x.code: i for i, x in enumerate(config.institutions)}

    # ---- the hot path ----------------------------------------------------------------------
    def apply_batch(self, requests: np.ndarray, results: np.ndarray | None = None, *,
                    business_date: int) -> np.ndarray:
        """Apply every request in order under `business_date` (YYYYMMDD); return the results.

        Raises BatchShapeError when an array has the wrong dtype or shape; never for a bad
        message — those get a response code in their result row.
        """
        _check_array("requests", requests, REQUEST_DTYPE, False)
        if results is None:
            results = np.empty(requests.shape[0], dtype=RESULT_DTYPE)
        _check_array("results", results, RESULT_DTYPE, True)
        if results.shape[0] < requests.shape[0]:
            raise BatchShapeError(f"results: {results.shape[0]} rows for {requests.shape[0]} requests")
        if not 19000101 <= business_date <= 99991231:
            raise BatchShapeError(f"business_date: {business_date}, expecting YYYYMMDD")
        warnings_before = int(self.arrays["meta"][META_WARNINGS])
        self.core.apply(requests, results[:requests.shape[0]], business_date)
        missing = int(self.arrays["meta"][META_WARNINGS]) - warnings_before
        if missing:
            log.warning("configuration warning (参保地政策缺失): %d settlement(s) found no policy for "
                        "the card's (region, insurance type, person type, visit type, level); "
                        "answered 12. Remedy: add the policy to the node configuration.", missing)
        return results[:requests.shape[0]]

    def replay_rows(self, rows, row_size_bytes: int, request_offset: int, result_offset: int, *,
                    business_date: int) -> int:
        """Recovery: apply the requests held in journal rows (any buffer of `row_size_bytes`-byte
        rows, a request at `request_offset`, the recorded result at `result_offset`) exactly as
        `apply_batch` would, comparing each result with the recorded one in C without copying
        either column out. Returns the index of the first row that answers differently, or -1
        (the state is then partly replayed: the caller stops). Rows must be 8-byte aligned.

        >>> engine.replay_rows(memoryview(records), 304, 16, 176, business_date=20261124)  # doctest: +SKIP
        -1
        """
        if not 19000101 <= business_date <= 99991231:
            raise BatchShapeError(f"business_date: {business_date}, expecting YYYYMMDD")
        warnings_before = int(self.arrays["meta"][META_WARNINGS])
        bad = self.core.replay(rows, row_size_bytes, request_offset, result_offset, business_date)
        missing = int(self.arrays["meta"][META_WARNINGS]) - warnings_before
        if missing:
            log.warning("configuration warning (参保地政策缺失): %d replayed settlement(s) found no policy; "
                        "answered 12 (as recorded). Remedy: add the policy to the node configuration.", missing)
        return bad

    # ---- capacity ----------------------------------------------------------------------------
    @property
    def card_count(self) -> int:
        return int(self.arrays["meta"][META_CARD_COUNT])

    @property
    def card_capacity(self) -> int:
        return self.arrays["cards"].shape[0]

    def reserve(self, card_count: int, exact: bool = False):
        """Make room for `card_count` cards in all (between batches; copies the columns): at
        least twice the capacity before, or exactly `card_count` (`exact`: a replay repeating a
        journaled growth). A node journals its growth: `Node.reserve_cards`."""
        if card_count <= self.card_capacity:
            return
        capacity = card_count if exact else max(card_count, self.card_capacity * 2)
        grown = card_arrays(capacity)
        n = self.card_capacity
        for name, column in grown.items():
            if not name.endswith("_index"):
                column[:n] = self.arrays[name][:n]
        self.arrays.update(grown)
        _core.rebuild_card_indexes(self.arrays)
        self.core.bind(self.arrays)

    def bytes_per_card(self) -> float:
        return card_bytes(self.arrays) / self.card_capacity

    # ---- reading -------------------------------------------------------------------------------
    def slot_of(self, pan_hash: int) -> int:
        """Slot of a card by its PAN hash, -1 when unknown (Python-speed: tests and tools)."""
        hits = np.flatnonzero(self.arrays["cards"]["pan_hash"][:self.card_count] == np.uint64(pan_hash))
        return int(hits[0]) if hits.size else -1

    def balances(self, slot: int) -> tuple[int, int]:
        card = self.arrays["cards"][slot]
        return int(card["ins_balance_fen"]), int(card["fin_balance_fen"])

    def column(self, name: str) -> np.ndarray:
        """A card field as a (strided) view over the card slots in use: `column("status")`."""
        for table in ("cards", "side"):
            if name in self.arrays[table].dtype.names:
                return self.arrays[table][name][:self.card_count]
        return self.arrays[name][:self.card_count]
