"""Named statistic slots, accumulated in place on the device of the values they receive.

``StatSlots`` holds one row (see :mod:`monitor.stats`) per metric name and per device that
has fed it. Python numbers and numpy values are accumulated on the CPU and never touch an
accelerator; tensors are accumulated on their own device with in-place tensor ops, so no
update ever waits for the device (no ``.item()``, no ``.cpu()``, no host-to-device copy).
At a flush, :meth:`StatSlots.local_rows` folds every device's rows into one matrix on the
reduction device; :meth:`StatSlots.reset` empties them without freeing memory.

Double buffering (hook-fed streams, see :class:`monitor.streams.SlotStream`): after
:meth:`StatSlots.split`, updates go to a second set of accumulators (the *next* buffer)
while :meth:`StatSlots.local_rows` keeps reading the *main* one. :meth:`StatSlots.fold`
combines the next buffer into the main one (exact moments, on the device, no sync) and
:meth:`StatSlots.take_main` empties the main buffer after a flush read it and makes the
next buffer the main one. So a stream can hold the values of the step it is due at apart
from those of the micro-batch that has just run, until it knows which step that
micro-batch belongs to.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from monitor import stats

_CPU = torch.device("cpu")
_MAX_CACHED_INDEXES = 64


def _host_number(name: str, value: object) -> float | None:
    """``value`` as a float if it is a host-side number, None if it is a tensor/array."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, np.ndarray):
        try:
            return float(value)
        except OverflowError:
            digits = len(str(abs(int(value)))) if isinstance(value, numbers.Integral) else None
            what = f"an int of {digits} digits" if digits else type(value).__name__
            raise ValueError(f"metric {name!r}: expected a number that fits in a float64 "
                             f"(|x| < 1.8e308), got {what}") from None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        _check_numpy_dtype(name, value.dtype)
        return float(value)
    if isinstance(value, (numbers.Complex, np.complexfloating)):
        raise TypeError(f"metric {name!r}: complex values are not supported, got {value!r}")
    return None


def _check_numpy_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise TypeError(
            f"metric {name!r}: expected a real numeric array, got numpy dtype {dtype}"
        )


def as_samples(name: str, value: object) -> float | torch.Tensor | None:
    """Normalise one logged value: a float, a tensor of samples, or None (nothing to log).

    Raises:
        TypeError: ``value`` is not a real number, numpy value or tensor.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"metric {name!r}: complex tensors are not supported ({value.dtype})")
        if value.layout != torch.strided:
            raise TypeError(f"metric {name!r}: expected a dense (strided) tensor, got layout "
                            f"{value.layout} (pass value.to_dense() if its zeros are samples)")
        if value.is_meta:
            raise TypeError(f"metric {name!r}: a tensor on the meta device has no values to "
                            "log (it only describes a shape)")
        return value.detach() if value.numel() else None
    number = _host_number(name, value)
    if number is not None:
        return number
    if isinstance(value, np.ndarray):
        _check_numpy_dtype(name, value.dtype)
        return torch.from_numpy(np.asarray(value, dtype=np.float64)) if value.size else None
    raise TypeError(
        f"metric {name!r}: expected a number, numpy value or torch.Tensor, "
        f"got {type(value).__name__}"
    )


class StatSlots:
    """Rows of statistics under fixed names, one accumulator tensor per device.

    Names are declared up front (:meth:`declare`); updating an undeclared name raises, so
    a hook can never create a slot that other ranks lack.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._index: dict[str, int] = {}
        self._acc: dict[torch.device, torch.Tensor] = {}
        """The main buffer (what a flush reads), one accumulator per device."""
        self._next: dict[torch.device, torch.Tensor] = {}
        """The next buffer: where updates go while split (kept empty otherwise)."""
        self._write = self._acc
        self._next_dirty = False
        self._index_cache: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}
        self._name_index: dict[tuple[torch.device, tuple[str, ...]], torch.Tensor] = {}
        self._order_index: dict[tuple[str, ...], tuple[list, list, dict]] = {}
        """Per flush order: its positions, its rows here, and both as index tensors."""
        self.declare(names)

    @property
    def names(self) -> list[str]:
        return list(self._index)

    @property
    def devices(self) -> set[torch.device]:
        """The devices whose accumulators hold this object's values."""
        return set(self._acc) | set(self._next)

    def declare(self, names: Iterable[str]) -> None:
        """Add slots for ``names`` that do not exist yet (host-side bookkeeping only)."""
        index = self._index
        new = [n for n in names if n not in index]  # most calls: nothing new
        for name in new:
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names must be non-empty strings, got {name!r}")
            index.setdefault(name, len(index))
        if new:
            self._order_index.clear()  # which names of a flush order exist here changed

    def update(self, values: Mapping[str, float | torch.Tensor]) -> None:
        """Fold normalised values (see :func:`as_samples`) into their slots.

        Scalars that share a device are folded in one batched update; each n-d tensor is
        one sample set (every element a sample).
        """
        scalars: dict[torch.device, tuple[list[int], list]] = {}
        for name, value in values.items():
            row = self._row(name)
            if isinstance(value, float):
                idx, vals = scalars.setdefault(_CPU, ([], []))
                idx.append(row)
                vals.append(value)
            elif value.dim() == 0:
                idx, vals = scalars.setdefault(value.device, ([], []))
                idx.append(row)
                vals.append(value)
            else:
                stats.combine_into_(self._write_on(value.device), row,
                                    stats.row_of_samples(value))
        for device, (idx, vals) in scalars.items():
            if all(isinstance(v, float) for v in vals):
                batch = torch.tensor(vals, dtype=stats.DTYPE)
            else:
                batch = torch.stack([torch.as_tensor(v, dtype=stats.DTYPE) for v in vals])
            self._fold_scalars(device, idx, batch)

    def update_rows(self, names: tuple[str, ...], rows: torch.Tensor) -> None:
        """Fold precomputed rows ``(len(names), 6)`` into the slots ``names`` (hook path).

        ``names`` is a tuple the caller keeps (its index tensor is cached per device), with
        no name twice.
        """
        acc = self._write_on(rows.device)
        key = (rows.device, names)
        index = self._name_index.get(key)
        if index is None:
            index = _device_index(rows.device, [self._row(n) for n in names])
            self._name_index[key] = index
        stats.combine_into_(acc, index, rows)

    def local_rows(self, order: list[str], device: torch.device) -> torch.Tensor:
        """This process's rows for ``order`` (names it lacks stay empty), on ``device``."""
        out = stats.empty_rows(len(order), device)
        key = tuple(order)
        cached = self._order_index.get(key)
        if cached is None:  # a run flushes the same few orders over and over
            present = [(pos, self._index[n]) for pos, n in enumerate(order) if n in self._index]
            cached = ([p for p, _ in present], [r for _, r in present], {})
            if len(self._order_index) >= _MAX_CACHED_INDEXES:
                self._order_index.clear()
            self._order_index[key] = cached
        positions, sources, on_device = cached
        if not positions:
            return out
        pos = on_device.get(("pos", device))
        if pos is None:
            pos = on_device[("pos", device)] = _device_index(device, positions)
        for acc_device in list(self._acc):
            acc = self._acc_on(acc_device)
            src = on_device.get(("src", acc_device))
            if src is None:
                src = on_device[("src", acc_device)] = _device_index(acc_device, sources)
            picked = acc.index_select(0, src).to(device)
            out.index_copy_(0, pos, stats.combine(out.index_select(0, pos), picked))
        return out

    def reset(self) -> None:
        """Empty every slot of both buffers in place (memory stays allocated: flat across
        steps) and end a split."""
        for acc in (*self._acc.values(), *self._next.values()):
            stats.reset_rows_(acc)
        self._write, self._next_dirty = self._acc, False

    # -- double buffering (see the module docstring) -------------------------------------

    @property
    def is_split(self) -> bool:
        return self._write is not self._acc

    def split(self) -> None:
        """From now on, updates go to the next buffer (host bookkeeping only)."""
        self._write = self._next

    def fold(self) -> None:
        """Combine the next buffer into the main one and empty it; updates still go to the
        next buffer. Nothing to do (no kernel) when nothing was written there since."""
        if not self._next_dirty:
            return
        for device, nxt in self._next.items():
            acc = self._grown(self._acc, device, nxt.shape[0])
            block = acc[: nxt.shape[0]]
            block.copy_(stats.combine(block, nxt))
            stats.reset_rows_(nxt)
        self._next_dirty = False

    def take_main(self) -> None:
        """After a flush read the main buffer: empty it, and if split, make the next buffer
        the main one (updates go there, as before) and end the split."""
        for acc in self._acc.values():
            stats.reset_rows_(acc)
        if self.is_split:
            self._acc, self._next = self._next, self._acc
            self._write = self._acc
            self._next_dirty = False

    # -- internals ---------------------------------------------------------------------

    def _row(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"metric {name!r} was not declared; declared: {self.names}") from None

    def _acc_on(self, device: torch.device) -> torch.Tensor:
        """The main buffer's accumulator on ``device`` (what a flush reads)."""
        return self._grown(self._acc, device, len(self._index))

    def _write_on(self, device: torch.device) -> torch.Tensor:
        """The accumulator updates go to: the main buffer's, or the next one's when split."""
        if self._write is self._next:
            self._next_dirty = True
        return self._grown(self._write, device, len(self._index))

    @staticmethod
    def _grown(buffers: dict, device: torch.device, needed: int) -> torch.Tensor:
        acc = buffers.get(device)
        if acc is None or acc.shape[0] < needed:
            old = 0 if acc is None else acc.shape[0]
            with torch.inference_mode(False):  # a flush resets it in place, outside that mode
                grown = stats.empty_rows(max(needed, 2 * old), device)
            if acc is not None:
                grown[:old].copy_(acc)
            buffers[device] = acc = grown
        return acc

    def _fold_scalars(self, device: torch.device, idx: list[int], batch: torch.Tensor) -> None:
        acc = self._write_on(device)
        rows = stats.rows_of_scalars(batch.to(device, non_blocking=True))
        start = idx[0]
        if idx == list(range(start, start + len(idx))):
            block = acc[start : start + len(idx)]
            block.copy_(stats.combine(block, rows))
        else:
            stats.combine_into_(acc, self._index_on(device, tuple(idx)), rows)

    def _index_on(self, device: torch.device, idx: tuple[int, ...]) -> torch.Tensor:
        key = (device, idx)
        cached = self._index_cache.get(key)
        if cached is None:
            if len(self._index_cache) >= _MAX_CACHED_INDEXES:
                self._index_cache.clear()
            cached = self._index_cache[key] = _device_index(device, idx)
        return cached


def _device_index(device: torch.device, idx) -> torch.Tensor:
    """Row indexes on ``device`` without waiting for it (pinned, non-blocking copy)."""
    host = torch.tensor(list(idx), dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
