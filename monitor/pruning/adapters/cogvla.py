"""CogVLA: one object, ``CogVLAMonitoring``, that the training script talks to.

Usage (the calls the public CogVLA training script makes)::

    from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig

    cfg = CogVLAMonitoringConfig(monitor_log_interval=100, detailed_log_interval=500,
                                 pruning_event_log_interval=10,
                                 film_sample_layers=[0, 9, 18, 26])
    monitor = CogVLAMonitoring(run_dir=run_dir, run_id=run_id, config_name=dataset, cfg=cfg)
    vla = wrap_ddp(vla, device_id, find_unused=True)
    monitor.attach(vla)                        # after DDP / LoRA wrapping
    for step ...:
        monitor.set_groups(task_ids)           # optional: with cfg.group_names (per task)
        loss = vla(**batch).loss; ...
        monitor.log_step(step)                 # every micro-batch, after the forward
        with monitor.step(step, mode="train") as h:
            h.log(loss=loss.detach(), lr=lr, extra={"curr_action_l1_loss": l1})
    paths = monitor.finalize()                 # {"train": ..., "lfp": ..., ...}

Everything due at a step (training metrics and every observer's streams) is reduced in
one fused flush. Build it on every rank for global statistics, or on rank 0 only (as the
public script does) for rank 0's own: see ``MonitorSession``'s ``participation``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from monitor import groups
from monitor.alerts import IgnoresInstruction, LossSpike, UndecidedRouter
from monitor.checks import as_int, check_bool, check_positive_int
from monitor.integrations import add_integrations, check_extras
from monitor.observer import Observer
from monitor.part import FinishesOnExit, check_final_status
from monitor.pruning.adapters import unwrap
from monitor.pruning.adapters.cogvla_wiring import (
    CogVLAAggregationAdapter,
    CogVLAFiLMAdapter,
    CogVLALfpAdapter,
    CogVLAMoEAdapter,
)
from monitor.pruning.aggregation import AggregationObserver
from monitor.pruning.film import FiLMObserver
from monitor.pruning.moe import MoERouterObserver
from monitor.pruning.routing import PruningObserver
from monitor.schedule import check_step
from monitor.session import MonitorSession
from monitor.train import Monitor, StepHandle

PARTS = ("train", "lfp", "film", "moe", "aggr")


@dataclass(kw_only=True)
class CogVLAMonitoringConfig:
    """What to monitor and how often (fields and defaults of the CogVLA usage guide)."""

    enable_train_monitor: bool = True
    """Training scalars (loss, lr, extras) into ``monitor_logs/``."""
    enable_lfp_monitor: bool = True
    """LFP token routing in the LLM layers into ``lfp_logs/``."""
    enable_film_monitor: bool = True
    """FiLM gamma/beta of the sampled ViT blocks into ``film_logs/``."""
    enable_moe_monitor: bool = True
    """DINOv2/SigLIP mixing weights of the MoE fusion into ``moe_logs/``."""
    enable_aggr_monitor: bool = True
    """Aggregation-token compression into ``aggr_logs/``."""
    monitor_log_interval: int = 100
    """Steps between training-metric records."""
    detailed_log_interval: int = 500
    """Steps between detailed records (histograms, overlaps, token similarity)."""
    pruning_event_log_interval: int = 10
    """Steps between compact observer records (and ``get_summary()`` updates)."""
    enable_tensorboard: bool = False
    """Rank 0 writes TensorBoard events to ``{run_dir}/tensorboard/`` (``monitor[tensorboard]``)."""
    enable_wandb: bool | None = None
    """``None``: log into an existing ``wandb.run``; ``True``: that, or start a run;
    ``False``: never (``monitor[wandb]``)."""
    wandb_project: str | None = None
    """Project of a W&B run the monitor starts (``enable_wandb=True``; default "monitor")."""
    console: bool = True
    """A ``logging`` line on rank 0 at each train record (step, loss, lr, throughput)."""
    export_all: bool = False
    """TensorBoard/W&B get every value of every record (about 1,000 scalar keys with every
    part on) instead of the compact export (under 200; ``monitor.integrations.names``)."""
    console_samples_per_step: int | None = None
    """Global batch size, to show samples/s in the console line."""
    film_sample_layers: list[int] = field(default_factory=lambda: [0, 9, 18, 26])
    """ViT block indices whose FiLM gamma/beta are observed, in each encoder."""
    moe_collapse_threshold: float = 0.95
    """Mean expert weight above which the MoE observer counts a record as collapsed."""
    moe_collapse_patience: int = 3
    """Collapsed compact records in a row before the collapse alert."""
    participation: str = "auto"
    """``"auto"``, ``"all"`` or ``"local"``: whose statistics are reduced (MonitorSession)."""
    participation_timeout: float | None = None
    """Seconds rank 0 waits for the other ranks' monitors (default 10)."""
    handle_signals: bool = True
    """SIGTERM/SIGINT end the run as ``"terminated"`` (meta, summaries, the values since the
    last record) before the signal goes on as it would have (``monitor.signals``)."""
    group_names: list[str] | None = None
    """The tasks (or any labels) of the run, identical on every rank: with them, every
    observer keeps per-group statistics and ``eta2`` (samples labelled by ``set_groups``;
    ``monitor.groups``). None: off, nothing changes."""
    loss_spike_metric: str | None = "loss"
    """Training metric of the ``loss_spike`` alert (None: off; ``monitor.alerts``)."""
    loss_spike_k: float = 6.0
    """A spike: the record's max above mean + k std of the window's values."""
    loss_spike_window: int = 32
    """Earlier train records pooled into that mean and std."""
    loss_spike_warmup: int = 8
    """Train records seen before the first check."""
    lfp_margin_threshold: float | None = 1e-3
    """``undecided_router``: every LFP layer's mean top-k margin below this (None: off)."""
    lfp_margin_patience: int = 5
    """Undecided compact records in a row before the alert."""
    lfp_margin_warmup: int = 10
    """Compact LFP records never counted, at the start."""
    group_eta2_threshold: float | None = 0.01
    """``routing_ignores_instruction``: eta2 of the MoE weights / LFP ``p_keep`` below this
    (with group_names; None: off)."""
    group_eta2_patience: int = 5
    """Such records in a row before the alert."""

    def __post_init__(self) -> None:
        def name(field_name: str) -> str:
            return f"CogVLAMonitoringConfig.{field_name}"

        for flag in ("enable_train_monitor", "enable_lfp_monitor", "enable_film_monitor",
                     "enable_moe_monitor", "enable_aggr_monitor", "enable_tensorboard",
                     "console", "handle_signals", "export_all"):
            check_bool(name(flag), getattr(self, flag))
        check_bool(name("enable_wandb"), self.enable_wandb, none_ok=True)
        if self.wandb_project is not None and not isinstance(self.wandb_project, str):
            raise TypeError(f"{name('wandb_project')} must be a str or None, "
                            f"got {self.wandb_project!r}")
        if self.console_samples_per_step is not None:
            check_positive_int(name("console_samples_per_step"), self.console_samples_per_step)
        for interval in ("monitor_log_interval", "detailed_log_interval",
                         "pruning_event_log_interval"):
            check_positive_int(name(interval), getattr(self, interval))
        MoERouterObserver.check_collapse_settings(
            self.moe_collapse_threshold, self.moe_collapse_patience,
            names=(name("moe_collapse_threshold"), name("moe_collapse_patience")))
        layers = self.film_sample_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"{name('film_sample_layers')} must be a list of ints, "
                            f"got {layers!r}")
        layers = [as_int(f"{name('film_sample_layers')} must hold ints: an item", i)
                  for i in layers]
        if not layers:
            raise ValueError(f"{name('film_sample_layers')} must name at least one block (set "
                             "enable_film_monitor=False to turn FiLM off)")
        for i in layers:
            if i < 0:
                raise ValueError(f"{name('film_sample_layers')} must be >= 0, got {i}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{name('film_sample_layers')} has duplicates: {layers}")
        self.film_sample_layers = layers
        names = groups.check_group_names(self.group_names, name("group_names"))
        self.group_names = None if names is None else list(names)
        LossSpike(self.loss_spike_metric, self.loss_spike_k, self.loss_spike_window,
                  self.loss_spike_warmup, names=[name(f"loss_spike_{f}") for f in
                                                 ("metric", "k", "window", "warmup")])
        UndecidedRouter(self.lfp_margin_threshold, self.lfp_margin_patience,
                        self.lfp_margin_warmup, names=[name(f"lfp_margin_{f}") for f in
                                                       ("threshold", "patience", "warmup")])
        IgnoresInstruction([], self.group_eta2_threshold, self.group_eta2_patience,
                           names=[name("group_eta2_threshold"), name("group_eta2_patience")])


class CogVLAMonitoring(FinishesOnExit):
    """The CogVLA facade: the training monitor and the four observers on one session.

    Args:
        run_dir: the run's folder (``runs/{run_id}``).
        run_id: names every file; a single path component.
        config_name: free text in meta (the public script passes the dataset name).
        cfg: what to monitor (defaults: everything on).

    Attributes:
        train_monitor, lfp_observer, film_observer, moe_observer, aggr_observer: the parts,
            None when off.
    """

    def __init__(self, run_dir: str | os.PathLike, run_id: str, config_name: str | None = None,
                 cfg: CogVLAMonitoringConfig | None = None) -> None:
        cfg = CogVLAMonitoringConfig() if cfg is None else cfg
        if not isinstance(cfg, CogVLAMonitoringConfig):
            raise TypeError(f"cfg must be a CogVLAMonitoringConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        # a missing extra fails before any file is written
        check_extras(tensorboard=cfg.enable_tensorboard, wandb=cfg.enable_wandb)
        self.session = MonitorSession(run_dir, run_id, config_name=config_name,
                                      config=asdict(cfg), participation=cfg.participation,
                                      participation_timeout=cfg.participation_timeout,
                                      handle_signals=cfg.handle_signals)
        events, detailed = cfg.pruning_event_log_interval, cfg.detailed_log_interval
        s = self.session
        self.train_monitor = Monitor(
            session=s, log_interval=cfg.monitor_log_interval,
            spike_metric=cfg.loss_spike_metric, spike_k=cfg.loss_spike_k,
            spike_window=cfg.loss_spike_window, spike_warmup=cfg.loss_spike_warmup,
        ) if cfg.enable_train_monitor else None
        common: dict[str, Any] = {"event_interval": events, "detailed_interval": detailed,
                  "group_names": cfg.group_names}
        eta2: dict[str, Any] = {"eta2_threshold": cfg.group_eta2_threshold,
                "eta2_patience": cfg.group_eta2_patience}
        self.lfp_observer = PruningObserver(
            s, margin_threshold=cfg.lfp_margin_threshold,
            margin_patience=cfg.lfp_margin_patience, margin_warmup=cfg.lfp_margin_warmup,
            **eta2, **common,
        ) if cfg.enable_lfp_monitor else None
        self.film_observer = FiLMObserver(s, **common) if cfg.enable_film_monitor else None
        self.moe_observer = MoERouterObserver(
            s, collapse_threshold=cfg.moe_collapse_threshold,
            collapse_patience=cfg.moe_collapse_patience, **eta2, **common,
        ) if cfg.enable_moe_monitor else None
        self.aggr_observer = AggregationObserver(s, **common) if cfg.enable_aggr_monitor \
            else None
        add_integrations(s, tensorboard=cfg.enable_tensorboard, wandb=cfg.enable_wandb,
                         wandb_project=cfg.wandb_project, console=cfg.console,
                         samples_per_step=cfg.console_samples_per_step,
                         export_all=cfg.export_all)
        self._attached: torch.nn.Module | None = None
        self._paths: dict[str, str] | None = None
        self._warned_no_train = False

    @property
    def observers(self) -> dict[str, Observer]:
        parts = {"lfp": self.lfp_observer, "film": self.film_observer,
                 "moe": self.moe_observer, "aggr": self.aggr_observer}
        return {k: v for k, v in parts.items() if v is not None}

    def attach(self, model: torch.nn.Module) -> dict[str, int]:
        """Hook every enabled part into ``model`` (bare, DDP, PEFT or FSDP wrapped).

        Returns the number of hooks per part. A part that finds no module warns once and
        says so in meta; attaching the same model again does nothing, another model
        replaces the hooks.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            RuntimeError: after ``finalize()``.
        """
        root = unwrap(model)
        if self._paths is not None:
            raise RuntimeError("attach() after finalize(): build a new CogVLAMonitoring")
        if self._attached is root:
            return {part: obs.num_hooks for part, obs in self.observers.items()}
        for obs in self.observers.values():
            obs.remove_hooks()
        self._attached = root
        counts = {}
        for part, obs in self.observers.items():
            adapter = None
            try:
                adapter = self._adapter(part, obs, root)
                counts[part] = adapter.attach(root)
            except Exception as exc:  # noqa: BLE001 - an odd model must not stop training
                obs.remove_hooks()
                counts[part] = 0
                obs.describe(attach_error=f"{type(exc).__name__}: {exc}")
                warnings.warn(f"monitor {part}: attaching failed ({type(exc).__name__}: {exc}); "
                              "this part records nothing", RuntimeWarning, stacklevel=2)
                continue
            if counts[part] == 0:
                why = getattr(adapter, "why_nothing", None) or \
                    f"enabled but no {part.upper()} module was found in the model"
                warnings.warn(f"monitor {part}: {why}; nothing will be recorded for it "
                              "(see meta)", RuntimeWarning, stacklevel=2)
            obs.describe(found=counts[part] > 0)
        return counts

    def _adapter(self, part: str, obs: Observer, root: torch.nn.Module):
        if isinstance(obs, PruningObserver):
            return CogVLALfpAdapter(obs)
        if isinstance(obs, FiLMObserver):
            return CogVLAFiLMAdapter(obs, self.cfg.film_sample_layers)
        if isinstance(obs, MoERouterObserver):
            obs.set_experts(CogVLAMoEAdapter.expert_names(root))
            return CogVLAMoEAdapter(obs)
        if isinstance(obs, AggregationObserver):
            return CogVLAAggregationAdapter(obs)
        raise TypeError(f"no CogVLA adapter for the {part!r} observer {type(obs).__name__}")

    def set_groups(self, ids: object) -> None:
        """Label the samples of the next forward(s) for every observer: one index into
        ``cfg.group_names`` per sample (a list of ints, or a CPU or CUDA integer tensor),
        in effect until the next call; ``None`` labels nothing. Call it before the forward.
        No host sync (a tensor is checked on its device: ``monitor.groups``).

        Raises:
            ValueError: no ``group_names`` in the config; an id outside them in a list; or
                ids outside them in a tensor given before the last records (once, on every
                rank: the records and an ``invalid_group_ids`` alert say where).
            TypeError: the ids are not ints.
        """
        errors = [obs.take_group_error() for obs in self.observers.values()]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        if ids is None:
            for obs in self.observers.values():
                obs.set_groups(None)
            return
        if self.cfg.group_names is None:
            raise ValueError("set_groups() needs CogVLAMonitoringConfig(group_names=[...]): "
                             "the labels the ids index")
        labels = groups.make_group_ids(ids, len(self.cfg.group_names))
        for obs in self.observers.values():
            obs.set_groups(labels)

    def log_step(self, step: int) -> None:
        """The run is at ``step`` (every micro-batch, after its forward)."""
        if self.train_monitor is not None:
            self.train_monitor.log_step(step)
        elif self._paths is None:
            self.session.log_step(step)

    @contextlib.contextmanager
    def step(self, step: int, mode: str = "train") -> Iterator[StepHandle]:
        """The training monitor's ``step`` context (values are dropped when it is off)."""
        if self.train_monitor is not None:
            with self.train_monitor.step(step, mode) as handle:
                yield handle
            return
        self.log_step(step)  # the observers still learn the step
        if not self._warned_no_train:
            self._warned_no_train = True
            warnings.warn("monitor: step() logs nothing: enable_train_monitor is False",
                          RuntimeWarning, stacklevel=3)
        yield StepHandle.discarding(check_step(step), mode)

    def finalize(self, status: str = "completed") -> dict[str, str]:
        """Write what is pending (one fused flush), the summaries and meta; remove every
        hook. Idempotent. Returns the summary path of each part that is on.

        ``status="failed"`` writes the summaries and meta without a collective (what the
        context manager form does when the block raised).
        """
        return self.finish(check_final_status(status))

    def finish(self, status: str, error: str | None = None) -> dict[str, str]:
        """End every part with any status (``finalize``, the context manager); ``error``
        (an exception's type name) goes into the summaries and meta. Idempotent."""
        if self._paths is not None:
            return dict(self._paths)
        paths: dict[str, str] = {}
        try:
            if status == "completed":
                self.session.flush_all()
        except BaseException as exc:
            status, error = "failed", type(exc).__name__
            raise
        finally:
            if self.train_monitor is not None:
                # flushes only what the fused flush did not take (eval values left pending)
                paths["train"] = self.train_monitor.finish(status, error)
            for part, obs in self.observers.items():
                paths[part] = obs.finalize(status, flush=False, error=error)
            self._paths = paths
            self.session.finish(status, error)
        return dict(paths)


__all__ = [
    "AggregationObserver", "CogVLAAggregationAdapter", "CogVLAFiLMAdapter", "CogVLALfpAdapter",
    "CogVLAMoEAdapter", "CogVLAMonitoring", "CogVLAMonitoringConfig", "FiLMObserver",
    "Monitor", "MoERouterObserver", "PruningObserver",
]
