"""Counting probes for tests and benchmarks: collectives issued and host syncs made.

    from monitor.testing.probes import count_collectives, HostSyncSpy

    counter = count_collectives()          # every torch.distributed collective, counted
    ...; counter["n"], counter["calls"]; counter["restore"]()

    with HostSyncSpy(only_from="monitor") as spy:   # calls that read a tensor on the host
        ...                                          # made by code of the package "monitor"
    assert spy.calls == []

They patch ``torch.distributed`` and ``torch.Tensor`` in this process (restored on exit),
so use them in test processes and benchmarks, never in a training job.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from types import FrameType

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
    "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
)

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__",
                "__index__")
"""Tensor methods that hand a value to the host (on an accelerator: wait for it)."""


def count_collectives() -> dict:
    """Wrap every torch.distributed collective with a counter; returns the live counter.

    ``counter["n"]`` counts calls, ``counter["calls"]`` lists their names in order, and
    ``counter["restore"]()`` puts the originals back.
    """
    counter: dict = {"n": 0, "calls": []}
    originals = {}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        originals[name] = original

        def wrapped(*args, _original=original, _name=name, **kwargs):
            counter["n"] += 1
            counter["calls"].append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)
    def restore() -> None:
        for n, f in originals.items():
            setattr(dist, n, f)

    counter["restore"] = restore
    return counter


class HostSyncSpy:
    """Counts calls of :data:`SYNC_METHODS` on tensors while active.

    Args:
        only_from: count only calls with a frame of this package on the stack (its
            ``testing`` subpackage excluded), e.g. ``"monitor"``; None counts every call.
    """

    def __init__(self, only_from: str | None = None) -> None:
        self.calls: list[str] = []
        self._originals: dict = {}
        self._package: str | None = None
        self._testing: str | None = None
        if only_from is not None:
            root = os.path.dirname(sys.modules[only_from].__file__ or "")
            self._package = root + os.sep
            self._testing = os.path.join(root, "testing") + os.sep

    @property
    def counts(self) -> Counter:
        return Counter(self.calls)

    def _counted(self) -> bool:
        if self._package is None or self._testing is None:
            return True
        frame: FrameType | None = sys._getframe(3)
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(self._package) and not name.startswith(self._testing):
                return True
            frame = frame.f_back
        return False

    def __enter__(self) -> HostSyncSpy:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def spy(tensor, *args, _name=name, _original=original, **kwargs):
                if self._counted():
                    self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()
