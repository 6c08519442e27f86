"""Everything the monitor does with ``torch.distributed``: the only module of the running
monitor that imports it (``monitor.testing.probes`` patches it to count collectives in tests
and benchmarks, never in a training job).

Three jobs:

* :func:`detect_world` reads who this process is (process group first, then the
  ``torchrun`` environment variables: the one place environment variables are read).
* :class:`Participation` learns, *without a collective*, whether every rank built a
  monitor: each rank publishes a key in the default group's store at construction; at the
  first flush rank 0 waits (bounded) for all keys and publishes one decision that every rank
  reads. A monitor built on rank 0 alone therefore never issues a collective nobody answers.
* :class:`Reducer` reduces packed statistic rows with a constant number of collectives:
  a fixed-size header (MAX), one MAX buffer and one SUM buffer; after the first flush the
  header travels in the MAX buffer (2 collectives per flush). When ranks' metric sets
  differ, the union is reduced with two ``all_gather`` calls instead, so a flush never
  costs more than 3 collectives. ``ReduceOp.AVG``/``PREMUL_SUM`` are never used (gloo
  lacks them).

  *Which rank* comes free with the order of the two: the SUM buffer is built once the MAX
  result is known, so each rank adds, in :func:`monitor.stats.rank_columns` extra columns
  (1 up to 17 ranks, a function of the world size alone), its rank flags: "my finite max
  is the global max", "my finite min is the global min", "I saw a non-finite value", as
  distinct bits (:func:`monitor.stats.rank_flags`). Their float64 sums are exact, so the
  reduced rows name the lowest rank holding each extreme and every rank that saw a NaN/Inf,
  for any world size, in the same two collectives. The union path computes the same
  columns from the gathered rows. ``Reducer(..., forensics=False)`` leaves them out (the
  flush of before, kept for the benchmark's comparison).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from monitor import stats

SINGLE_PROCESS = "single_process"
ALL_RANKS = "all_ranks"
RANK0_ONLY = "rank0_only"
NO_PROCESS_GROUP = "no_process_group"
PARTICIPATION_MODES = ("auto", "all", "local")
DEFAULT_PARTICIPATION_TIMEOUT_S = 10.0
_TIMEOUT_ENV = "MONITOR_PARTICIPATION_TIMEOUT"
_POLL_S = 0.02


class RankMismatchError(RuntimeError):
    """Ranks reached a flush in disagreement (different steps or modes): nothing was reduced."""


@dataclass(frozen=True, slots=True)
class WorldInfo:
    """Who this process is. ``initialized`` is True when a process group is up."""

    rank: int
    world_size: int
    backend: str | None
    initialized: bool

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def detect_world() -> WorldInfo:
    """The process group if one is initialised, else ``RANK``/``WORLD_SIZE`` from torchrun."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()), True)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return WorldInfo(rank, world_size, None, False)


def participation_timeout(value: float | None) -> float:
    """Seconds to wait for the other ranks: ``value``, $MONITOR_PARTICIPATION_TIMEOUT or 10.

    Raises:
        TypeError: ``value`` is not a number (a string, a bool).
        ValueError: not a finite number > 0 (``inf`` would be a wait without end).
    """
    name = "participation_timeout"
    if value is None:
        raw = os.environ.get(_TIMEOUT_ENV, str(DEFAULT_PARTICIPATION_TIMEOUT_S))
        name = f"${_TIMEOUT_ENV}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds (int or float), got "
                        f"{type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def group_alive() -> bool:
    """Whether the default process group still exists (a script may destroy it first)."""
    return dist.is_available() and dist.is_initialized()


def reduction_device() -> torch.device:
    """Where flush buffers live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Participation:
    """Decides once, without a collective, whose statistics a flush reduces.

    Args:
        world: this process.
        key: a name identical on every rank for this monitor (its run id); monitors of the
            same run that use the store are told apart by their construction order.
        mode: ``"auto"`` (detect through the store), ``"all"`` (every rank built it: skip the
            wait) or ``"local"`` (never communicate; rank 0 writes its own statistics).
        timeout: seconds rank 0 waits for the other ranks' keys.
    """

    def __init__(self, world: WorldInfo, key: str, mode: str, timeout: float) -> None:
        if mode not in PARTICIPATION_MODES:
            raise ValueError(f"participation must be one of {PARTICIPATION_MODES}, got {mode!r}")
        self._world, self.mode, self._timeout = world, mode, timeout
        self.reason = "one process" if world.world_size <= 1 else ""
        self.decision: str | None = self._immediate_decision()
        if self.decision is None:
            number = next(_store_users.setdefault(key, itertools.count()))
            self._prefix = f"monitor/participation/{key}/{number}"
            self._store = dist.distributed_c10d._get_default_store()
            self._store.set(f"{self._prefix}/present/{world.rank}", "1")

    def _immediate_decision(self) -> str | None:
        w = self._world
        if w.world_size <= 1:
            return SINGLE_PROCESS
        if not w.initialized:
            self.reason = "torchrun environment without an initialised process group"
            return NO_PROCESS_GROUP
        if self.mode == "local":
            self.reason = "participation='local'"
            return RANK0_ONLY
        if self.mode == "all":
            self.reason = "participation='all'"
            return ALL_RANKS
        return None

    def decide(self) -> str:
        """The decision, waiting (bounded) the first time only."""
        if self.decision is None:
            self.decision = self._decide_as_rank0() if self._world.rank == 0 else self._follow()
        return self.decision

    def _decide_as_rank0(self) -> str:
        keys = [f"{self._prefix}/present/{r}" for r in range(1, self._world.world_size)]
        proposal = ALL_RANKS if _poll(self._store, keys, self._timeout) else RANK0_ONLY
        decision = self._settle(proposal)
        if decision == ALL_RANKS:
            self.reason = "every rank built a monitor"
        else:
            self.reason = (
                f"not every rank built a monitor within {self._timeout:g} s: statistics are "
                "rank 0's own (set participation_timeout or $MONITOR_PARTICIPATION_TIMEOUT "
                "to wait longer)"
            )
        return decision

    def _follow(self) -> str:
        key = f"{self._prefix}/decision"
        if _poll(self._store, [key], 2 * self._timeout + 30.0):
            decision = self._store.get(key).decode()
        else:
            decision = self._settle(RANK0_ONLY)
        if decision != ALL_RANKS:
            self.reason = "rank 0 reduces its own statistics only"
            warnings.warn(
                f"monitor on rank {self._world.rank}: {self.reason}; this rank's values are "
                "not reduced and it writes nothing",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            self.reason = "every rank built a monitor"
        return decision

    def _settle(self, proposal: str) -> str:
        """First writer wins, atomically: every rank ends up reading the same decision."""
        return self._store.compare_set(f"{self._prefix}/decision", "", proposal).decode()


_store_users: dict[str, itertools.count] = {}


def _poll(store, keys: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if store.check(keys):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _code(text: str, nbytes: int = 6) -> int:  # 48 bits: exact in float64 too
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=nbytes).digest(), "big")


Layout = dict[str, list[str]]


class Reducer:
    """Reduces packed rows across the participating ranks (or returns them as they are).

    ``reduce`` takes ``layout`` (group -> ordered metric names; every rank must pass the
    groups in the same order) and ``rows`` (their local rows, concatenated) and returns the
    layout actually reduced (the union over ranks) with the reduced rows on the host.
    """

    HEADER = ("step", "-step", "mode", "-mode", "schema", "-schema", "rows", "-rows", "blob")

    def __init__(self, collective: bool, device: torch.device, *, forensics: bool = True) -> None:
        self.collective = collective
        self.device = device
        self.forensics = forensics
        """Whether reduced rows carry the rank columns (``monitor.stats.rank_flags``)."""
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if collective \
            else (0, 1)
        self._schemas: dict[tuple, tuple[bytes, int]] = {}
        self.capacity = 0
        """Rows the first collective of a flush carries with the header (agreed by every
        rank: derived from reduced headers only). 0 until the first flush."""

    def reduce(self, layout: Layout, rows: torch.Tensor, step: int, mode: str):
        """Two collectives per flush once the first flush has fixed the capacity (the
        header rides on the MAX buffer); three at the first flush, when the rows outgrow
        the capacity, or when ranks disagree on the names (the union path)."""
        if not self.collective:  # rank 0's own values (one process, or rank 0 alone)
            if self.forensics:
                rows = torch.cat([rows, stats.rank_flags(rows, rows[:, stats.MIN],
                                                         rows[:, stats.MAX], 0, 1)], dim=1)
            return layout, rows.cpu()  # host sync: once per flush
        blob, schema = self._schema(layout)
        num = rows.shape[0]
        mode_code = _code(mode)
        mine = [step, -step, mode_code, -mode_code, schema, -schema, num, -num, len(blob)]
        cap, start = self.capacity, len(mine)
        if cap:
            # one MAX buffer: the header (exact in float64: every value is below 2**53),
            # then each row's max and -min, padded with -inf up to the capacity
            fused = torch.full((start + 2 * cap,), -math.inf, dtype=stats.DTYPE,
                               device=self.device)
            fused[:start] = torch.tensor(mine, dtype=stats.DTYPE, device=self.device)
            if num <= cap:  # else: the header says so and every rank falls back below
                fused[start : start + num] = rows[:, stats.MAX]
                fused[start + cap : start + cap + num] = -rows[:, stats.MIN]
            dist.all_reduce(fused, op=dist.ReduceOp.MAX)
            # host sync: once per flush (header)
            h, same = self._header([int(v) for v in fused[:start].tolist()], step, mode)
            if same and h["rows"] <= cap:
                hi, lo = fused[start : start + num], -fused[start + cap : start + cap + num]
                return layout, self._sums(rows, lo, hi)
        else:
            header = torch.tensor(mine, dtype=torch.int64, device=self.device)
            dist.all_reduce(header, op=dist.ReduceOp.MAX)
            # host sync: once per flush (header)
            h, same = self._header(header.tolist(), step, mode)
        if h["rows"] > cap:  # every rank computes the same capacity from the same header
            self.capacity = 1 << max(h["rows"] - 1, 0).bit_length()
        if same:
            return layout, self._reduce_same_schema(rows)
        return self._reduce_union(layout, rows, blob, h["rows"], h["blob"])

    @classmethod
    def _header(cls, values: list[int], step: int, mode: str) -> tuple[dict, bool]:
        """The reduced header by name, and whether every rank has the same layout; raises
        on every rank when the ranks are at different steps or modes."""
        h = dict(zip(cls.HEADER, values))
        if h["step"] != -h["-step"] or h["mode"] != -h["-mode"]:
            raise RankMismatchError(
                f"monitor: ranks disagree at a flush (this rank: step {step}, mode {mode!r}; "
                f"steps seen across ranks range {-h['-step']}..{h['step']}, "
                f"modes {'agree' if h['mode'] == -h['-mode'] else 'differ'}). Every rank must "
                "call step()/log_step() with the same step numbers; nothing was reduced."
            )
        return h, h["schema"] == -h["-schema"] and h["rows"] == -h["-rows"]

    def _schema(self, layout: Layout) -> tuple[bytes, int]:
        """The layout as JSON bytes and their hash, remembered for the layouts seen last
        (a run flushes the same few layouts over and over)."""
        key = tuple((group, tuple(names)) for group, names in layout.items())
        cached = self._schemas.get(key)
        if cached is None:
            if len(self._schemas) >= 16:
                self._schemas.clear()
            blob = json.dumps(layout, separators=(",", ":")).encode()
            cached = self._schemas[key] = (blob, _code(blob.decode()))
        return cached

    def _reduce_same_schema(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        extremes = torch.cat([rows[:, stats.MAX], -rows[:, stats.MIN]])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        return self._sums(rows, -extremes[n:], extremes[:n])

    def _sums(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """The SUM collective, shifted by the global midrange (exact for constant data),
        with this rank's flags against the global extremes in the rank columns."""
        shift = stats.midrange_shift(lo, hi)
        sums = stats.shifted_sums(rows, shift)
        if self.forensics:
            flags = stats.rank_flags(rows, lo, hi, self.rank, self.world_size)
            sums = torch.cat([sums, flags], dim=1)
        sums = sums.contiguous()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        out = stats.rows_from_sums(sums, shift, lo, hi)
        if self.forensics:
            out = torch.cat([out, sums[:, stats.NUM_SUMS:]], dim=1)
        return out.cpu()  # host sync: results

    def _reduce_union(self, layout: Layout, rows: torch.Tensor, blob: bytes, max_rows: int,
                      max_blob: int):
        world = dist.get_world_size()
        padded_blob = torch.zeros(max_blob, dtype=torch.uint8, device=self.device)
        padded_blob[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        blobs = [torch.empty_like(padded_blob) for _ in range(world)]
        dist.all_gather(blobs, padded_blob)
        padded_rows = stats.empty_rows(max_rows, self.device)
        padded_rows[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded_rows) for _ in range(world)]
        dist.all_gather(gathered, padded_rows)
        layouts = [json.loads(bytes(b.cpu().numpy()).rstrip(b"\0")) for b in blobs]
        groups = sorted({g for lay in layouts for g in lay})
        union = {g: sorted({n for lay in layouts for n in lay.get(g, [])}) for g in groups}
        position = {(g, n): i for i, (g, n) in enumerate(_flat(union))}
        total = stats.empty_rows(len(position), "cpu")
        every = []
        for lay, their_rows in zip(layouts, gathered):
            keys = _flat(lay)
            idx = torch.tensor([position[k] for k in keys], dtype=torch.long)
            placed = stats.empty_rows(len(position), "cpu")
            placed[idx] = their_rows[: len(keys)].cpu()
            total = stats.combine(total, placed)
            every.append(placed)
        if self.forensics:  # every rank's rows are here: the same flags as the SUM path
            lo, hi = total[:, stats.MIN], total[:, stats.MAX]
            flags = torch.zeros(total.shape[0], stats.rank_columns(world), dtype=stats.DTYPE)
            for r, placed in enumerate(every):
                flags += stats.rank_flags(placed, lo, hi, r, world)
            total = torch.cat([total, flags], dim=1)
        return union, total


def _flat(layout: Layout) -> list[tuple[str, str]]:
    return [(g, n) for g, names in layout.items() for n in names]
