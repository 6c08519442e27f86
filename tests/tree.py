"""The tests' view of one run's log tree: every path comes from :class:`monitor.layout.RunLayout`
(no test spells ``monitor_logs/...`` itself; ``test_demo.py`` pins the layout to the
documented tree once), and every JSONL file is read by the package's one reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

from monitor.layout import (
    LOCK_NAME,
    TENSORBOARD,
    TRAIN,
    RunLayout,
    folder_of,
    read_records,
    validate_part,
)

KINDS = ("stream", "detailed", "summary", "meta")
"""The files of the tree a test names: a part's main JSONL, its detailed JSONL, its summary,
and the run's meta (one per run, no part)."""


class Tree:
    """The files of run ``run_id`` under ``run_dir`` (see :func:`tree`)."""

    def __init__(self, run_dir: str | os.PathLike, run_id: str) -> None:
        self.root = Path(run_dir)
        self.layout = RunLayout(run_id)

    def path(self, kind: str = "stream", part: str = TRAIN) -> Path:
        """The path of a file of the tree: ``kind`` is one of :data:`KINDS` (``meta`` takes
        no part)."""
        if kind == "meta":
            if part != TRAIN:
                raise ValueError(f"meta belongs to the run, not to part {part!r}")
            return self.root / self.layout.meta
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.root / getattr(self.layout, kind)(self._part(part))

    def folder(self, part: str = TRAIN) -> Path:
        """The folder of ``part``'s files."""
        return self.root / folder_of(self._part(part))

    @staticmethod
    def _part(part: str) -> str:
        """``train`` or an observer part's name (never ``monitor``, the training folder's)."""
        return part if part == TRAIN else validate_part(part)

    def records(self, part: str = TRAIN) -> list[dict]:
        """Every record of ``part``'s main JSONL (alert and resume lines too)."""
        return read_records(self.path("stream", part))

    def metric_records(self, part: str = TRAIN) -> list[dict]:
        """The metric records of ``part``'s main JSONL (no alert or resume lines)."""
        return [r for r in self.records(part) if "metrics" in r]

    def detailed(self, part: str) -> list[dict]:
        """Every record of ``part``'s detailed JSONL."""
        return read_records(self.path("detailed", part))

    def summary(self, part: str = TRAIN) -> dict:
        """``part``'s summary, parsed (a missing or broken file raises)."""
        return json.loads(self.path("summary", part).read_text())

    def meta(self) -> dict:
        """The run's meta, parsed (a missing or broken file raises)."""
        return json.loads(self.path("meta").read_text())


def tree(run_dir: str | os.PathLike, run_id: str) -> Tree:
    """The log tree of run ``run_id`` written under ``run_dir`` (``runs/{run_id}``)."""
    return Tree(run_dir, run_id)


def tensorboard_dir(run_dir: str | os.PathLike) -> Path:
    """The run folder's TensorBoard event folder (every run id and resumed segment's)."""
    return Path(run_dir) / TENSORBOARD


def lock_file(run_dir: str | os.PathLike) -> Path:
    """The run folder's lock file, held while a monitor writes there."""
    return Path(run_dir) / LOCK_NAME
