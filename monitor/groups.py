"""Per-task groups: labels of the samples, their slots' names, and how much the task explains.

With ``group_names`` (the tasks of a run, or any labels, fixed for the run and identical on
every rank), an observer keeps, beside each of its combined metrics, one statistic row per
group: slot ``groups/{group}/{metric}`` holds the samples of that metric whose sample was
labelled ``group``. The labels come from ``set_groups(ids)`` before the forward: one index
into ``group_names`` per sample of the batch, in effect until the next call
(:class:`GroupIds`). Group slots are declared up front (``len(group_names)`` per metric) and
travel in the same fused buffers as every other slot, so a flush costs the same collectives
whatever the number of groups.

**Checking the ids.** A list of ints is checked at once, on the host (``ValueError``
naming the bad ids). A tensor (CPU or CUDA) is checked where it lives, without reading it
back: ids outside ``0 .. G-1`` go to a discard bucket (nothing indexes out of bounds; those
samples are in no group, still in every other statistic), and their values are counted in
the slot :data:`INVALID` of the compact stream, reduced with everything else. At the flush
(its one host sync) a record holding that slot writes an ``invalid_group_ids`` alert, and
the observer's next ``set_groups()`` call raises ``ValueError`` on every rank (every rank
reads the same reduced count, so every rank raises at the same call: no rank is left in a
collective alone).

**eta^2** (the correlation ratio) of a metric over a record's interval is

    eta2 = SS_between / SS_total,
    SS_between = sum_g n_g (mean_g - mean)^2,   SS_total = SS_between + sum_g M2_g,

over the groups' reduced rows (``n_g`` samples, mean ``mean_g``, sum of squared deviations
``M2_g``; ``mean`` the pooled mean): exact, from the moments the flush already reduced, with
no collective of its own. 0: every group has the same mean (the task explains none of the
variation: every task routes alike); 1: the samples of a group are all alike and only the
task moves the value (the task decides everything). A group's samples are its samples'
values, one per sample and hook call (the sample's mean over the components and elements of
that call: :func:`monitor.stats.grouped_rows`), so eta^2 says how much of the spread *between
samples* the task explains, not the spread between layers or tokens.

A record's ``eta2`` of a metric is ``{"value", "chance", "groups", "count"}``: ``value`` is
eta^2 (null when fewer than two groups saw a value or every value is the same: no variation
to explain), ``groups`` the groups with a value, ``count`` their samples, and ``chance`` =
``(groups - 1) / (count - 1)``, what eta^2 is on average when the task has no effect at all
(independent samples): with few samples per group eta^2 is high by chance alone (one sample
per group gives 1), so read ``value`` against ``chance``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from monitor import stats
from monitor.records import GROUP_PREFIX

PREFIX = GROUP_PREFIX
"""Group slot names start with this: ``groups/{group}/{metric}``."""
INVALID = "invalid_group_ids"
"""The compact-stream slot counting ids outside ``group_names`` (their values as samples)."""


def check_group_names(names: object, field: str = "group_names") -> tuple[str, ...] | None:
    """``names`` as a tuple of distinct, non-empty strings usable in metric names (None
    stays None: no groups).

    Raises:
        TypeError: not a list/tuple of strings.
        ValueError: empty, a duplicate, or a name that is empty, holds a ``/`` or a
            character that is not printable.
    """
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"{field} must be a list of str (or None for no groups), got "
                        f"{type(names).__name__} {names!r:.60}")
    out = tuple(names)
    if not out:
        raise ValueError(f"{field} must name at least one group (None turns groups off)")
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"{field} must hold str, got {type(name).__name__} {name!r}")
        if not name or "/" in name or not name.isprintable():
            raise ValueError(f"{field}: {name!r} cannot name a group: a group name must be a "
                             "non-empty string of printable characters without '/'")
    if len(set(out)) != len(out):
        twice = sorted({n for n in out if out.count(n) > 1})
        raise ValueError(f"{field} has duplicates: {twice}")
    return out


def key(group: str, metric: str) -> str:
    """The slot (and record key) of ``metric`` in ``group``."""
    return f"{PREFIX}{group}/{metric}"


@dataclass(frozen=True)
class GroupIds:
    """One ``set_groups()`` call's labels, ready for the hooks (never changed afterwards,
    so a deferred hook call may hold it).

    Attributes:
        ids: ``(B,)`` long, on the device the ids came on; an id outside ``0 .. G-1`` is
            replaced by ``G`` (the discard bucket).
        invalid: for a tensor, the ``(1, 6)`` row of the ids outside the range (COUNT: how
            many, MIN/MAX: the smallest and largest), on its device; None for a list
            (checked on the host).
    """

    ids: torch.Tensor
    invalid: torch.Tensor | None
    num_groups: int
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def memo(self, key: object, make):
        """``make()``, computed once for these labels (rows every call of a step shares)."""
        key = ("memo", key)
        if key not in self._copies:
            self._copies[key] = make()
        return self._copies[key]

    def on(self, device: torch.device) -> torch.Tensor | None:
        """The ids on ``device``: a CPU tensor goes to a CUDA device through pinned memory
        without waiting; ids already on an accelerator are never read back to the CPU
        (None: those values cannot be grouped without a sync)."""
        ids = self.ids
        if ids.device == device:
            return ids
        if ids.device.type != "cpu":
            return None
        copy = self._copies.get(device)
        if copy is None:
            if device.type == "cuda":
                ids = ids.pin_memory()
            copy = self._copies[device] = ids.to(device, non_blocking=True)
        return copy


def make_group_ids(ids: object, num_groups: int) -> GroupIds:
    """Normalise ``set_groups()``'s argument (see the module docstring).

    Raises:
        TypeError: not a list/tuple of ints or an integer tensor.
        ValueError: a list with an id outside ``0 .. num_groups - 1``; a tensor that is not
            1-d.
    """
    if isinstance(ids, GroupIds):
        if ids.num_groups != num_groups:
            raise ValueError(f"group ids were made for {ids.num_groups} groups, this observer "
                             f"has {num_groups}")
        return ids
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"group ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"group ids must be 1-d (one per sample), got shape "
                             f"{tuple(ids.shape)}")
        ids = ids.detach().to(torch.long)
        bad = (ids < 0) | (ids >= num_groups)
        invalid = stats.rows_of_samples(ids.to(stats.DTYPE).unsqueeze(0), bad.unsqueeze(0))
        return GroupIds(torch.where(bad, num_groups, ids), invalid, num_groups)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"group ids must be a list of ints or an integer tensor, got "
                        f"{type(ids).__name__}")
    values = []
    for i in ids:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"group ids must be ints, got {type(i).__name__} {i!r}")
        values.append(int(i.__index__()))
    bad_ids = sorted({i for i in values if not 0 <= i < num_groups})
    if bad_ids:
        raise ValueError(f"group ids {bad_ids[:10]} are outside 0..{num_groups - 1} (one "
                         f"index into group_names, {num_groups} names, per sample)")
    return GroupIds(torch.tensor(values, dtype=torch.long), None, num_groups)


def invalid_ids_error(part: str, value: dict, num_groups: int) -> ValueError:
    """The error of a record whose :data:`INVALID` slot saw ids (a reduced value object)."""
    ranks = sorted({r for r in (value.get("min_rank"), value.get("max_rank")) if r is not None})
    where = f" (on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" \
        if ranks else ""
    lo, hi = value.get("min"), value.get("max")
    span = f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"
    return ValueError(
        f"monitor {part}: set_groups() was given {value['count']} group id(s) outside "
        f"0..{num_groups - 1}{where}: ids {span}. Each id indexes group_names "
        f"({num_groups} names); those samples were left out of every group (see the "
        "invalid_group_ids alert)")


def eta2_values(rows: torch.Tensor) -> list[dict]:
    """The ``eta2`` object of each metric from its groups' reduced rows ``(M, G, >= 6)``
    (host rows): ``{"value", "chance", "groups", "count"}`` (see the module docstring)."""
    r = rows[..., : stats.NUM_COLS].to(stats.DTYPE)
    n, mean, m2 = r[..., stats.COUNT], r[..., stats.MEAN], r[..., stats.M2]
    seen = n > 0
    total = n.sum(dim=1)
    grand = (n * mean).sum(dim=1) / total.clamp(min=1.0)
    between = torch.where(seen, n * (mean - grand.unsqueeze(1)).square(), 0.0).sum(dim=1)
    within = torch.where(seen, m2, 0.0).sum(dim=1)
    ss = between + within
    lo = torch.where(seen, r[..., stats.MIN], math.inf).amin(dim=1)
    hi = torch.where(seen, r[..., stats.MAX], -math.inf).amax(dim=1)
    num = seen.sum(dim=1)
    defined = (num >= 2) & (hi > lo) & (ss > 0)
    value = (between / ss.clamp(min=1e-300)).clamp(0.0, 1.0)
    out = []
    for v, ok, g, count in zip(value.tolist(), defined.tolist(), num.tolist(),
                               total.to(torch.int64).tolist()):
        chance = (g - 1) / (count - 1) if g >= 2 and count > 1 else None
        out.append({"value": v if ok else None, "chance": chance, "groups": g,
                    "count": count})
    return out


def informative(eta2: dict) -> bool:
    """Whether an ``eta2`` object can tell a task-blind routing from chance: defined, and
    at least two samples per group on average (``count >= 2 * groups``)."""
    return eta2.get("value") is not None and eta2.get("chance") is not None and \
        eta2["count"] >= 2 * eta2["groups"]


__all__ = ["INVALID", "PREFIX", "GroupIds", "check_group_names", "eta2_values", "informative",
           "key", "make_group_ids"]
