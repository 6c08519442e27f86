"""``FiLMObserver``: feature-wise modulation ``x * (1 + gamma) + beta``, model-agnostic.

An adapter feeds the gamma and beta a FiLM layer produced, ``(B, width)`` each, under a
component name (e.g. ``siglip/layer_09``). They may come from two hooks, in either order:
the observer pairs them per component to compute ``modulation_strength``.

``modulation_strength`` is how far the modulation is from the identity
(gamma = 0, beta = 0), per sample::

    modulation_strength = sqrt(mean_c(gamma_c^2) + mean_c(beta_c^2))

For an input whose channels have zero mean and unit variance, it is the RMS of the change
FiLM makes, ``x * gamma + beta``, relative to the input's own RMS (0: identity; 0.1: the
modulation moves each feature by about 10 % of its scale). It is dimensionless and
comparable across encoders of different widths.

Keys (``{c}`` a component; ``overall/{m}`` combines every component):

==============================  ===================================================  ========
key                             samples (one per ...)                                stream
==============================  ===================================================  ========
``{c}/gamma``, ``{c}/beta``     element of gamma / beta (mean/std/min/max of values)   events
``{c}/gamma_norm``              sample: L2 norm of its gamma vector                  events
``{c}/beta_norm``               sample: L2 norm of its beta vector                   events
``{c}/modulation_strength``     sample (see above)                                   events
``{c}/gamma``, ``{c}/beta``     histograms of the elements over fixed bins           detailed
==============================  ===================================================  ========

With ``group_names``: ``groups/{g}/{m}`` for the three ``overall/{m}`` (one value per sample
per pass: its mean over every component of the pass) and the record's ``eta2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monitor import stats
from monitor.observer import Observer, joined_names
from monitor.pruning.summary import by_group
from monitor.session import MonitorSession

EVENT_METRICS = ("gamma", "beta", "gamma_norm", "beta_norm", "modulation_strength")
OVERALL = ("gamma_norm", "beta_norm", "modulation_strength")
DEFAULT_EDGES = tuple(k / 20 for k in range(-20, 21))  # -1.0, -0.95, ..., 1.0 exactly


class FiLMObserver(Observer):
    """Statistics of FiLM gamma/beta per component (sampled layer of an encoder).

    Args:
        session: the run (shared with the training monitor).
        components: component names, e.g. ``["dino/layer_00", "siglip/layer_00"]``.
        event_interval: steps between compact records.
        detailed_interval: steps between detailed records.
        hist_edges: bin edges of the gamma and beta histograms.
        group_names: per-task groups (see :class:`~monitor.observer.Observer`): each
            ``overall/{m}`` gets ``groups/{group}/{m}`` and ``eta2/{m}``.
    """

    part = "film"
    overall_metrics = OVERALL

    def __init__(self, session: MonitorSession, components: Sequence[str] = (), *,
                 event_interval: int = 10, detailed_interval: int = 500,
                 hist_edges: Sequence[float] = DEFAULT_EDGES,
                 group_names: Sequence[str] | None = None) -> None:
        super().__init__(session, event_interval=event_interval,
                         detailed_interval=detailed_interval, group_names=group_names)
        self.declare_groups(OVERALL)
        self._edges = [float(e) for e in hist_edges]
        self.components: list[str] = []
        self._names: dict[str, dict[str, tuple]] = {}
        self.add_components(components)

    def add_components(self, components: Sequence[str]) -> None:
        """Declare the slots of ``components`` (call before their hooks fire)."""
        for c in components:
            if c in self._names:
                continue
            self.declare([f"{c}/{m}" for m in EVENT_METRICS])
            self._names[c] = {
                "gamma": (f"{c}/gamma", f"{c}/gamma_norm"),
                "beta": (f"{c}/beta", f"{c}/beta_norm"),
                "strength": (f"{c}/modulation_strength",),
                "gamma_hist": self.declare_histogram(f"{c}/gamma", self._edges),
                "beta_hist": self.declare_histogram(f"{c}/beta", self._edges),
            }
            self.components.append(c)

    def observe(self, component: str, gamma: torch.Tensor | None = None,
                beta: torch.Tensor | None = None) -> None:
        """Gamma and/or beta of one FiLM call, ``(B, width)`` (more leading dims allowed).

        Deferred: computed with the other calls of the forward pass (see
        :meth:`Observer.defer`); a gamma and a beta of one component in one pass are paired
        for ``modulation_strength`` whichever comes first.

        Raises:
            KeyError: ``component`` was not declared.
        """
        if component not in self._names:
            raise KeyError(f"component {component!r} was not declared; "
                           f"declared: {self.components}")
        for kind, value in (("gamma", gamma), ("beta", beta)):
            if value is None or value.numel() == 0:
                continue
            value = value.detach().reshape(-1, value.shape[-1])
            self.defer((component, kind), self._observe_deferred,
                       (component, kind, self.current_groups, value,
                        self.inplace_version(value)))

    def _observe_deferred(self, items: list[tuple]) -> None:
        groups: dict[tuple, list[tuple]] = {}
        for component, kind, labels, value, _ in self.unchanged(items):
            groups.setdefault((value.shape, value.device, id(labels)), []).append(
                (component, kind, value, labels))
        by_labels: dict[int, list] = {}
        for group in groups.values():
            values = torch.stack([v for _, _, v, _ in group]).to(stats.DTYPE)  # (n, B, width)
            n = values.shape[0]
            names = [self._names[c] for c, _, _, _ in group]
            element = stats.rows_of_samples(values.reshape(n, -1))
            norms = values.norm(dim=2)  # (n, B)
            norm = stats.rows_of_samples(norms)
            self.events.slots.update_rows(
                joined_names([nm[kind] for nm, (_, kind, _, _) in zip(names, group)]),
                torch.stack([element, norm], dim=1).reshape(-1, stats.NUM_COLS))
            self.add_to_histograms([nm[f"{kind}_hist"]
                                    for nm, (_, kind, _, _) in zip(names, group)],
                                   values.reshape(n, -1))
            strength = self._strength(group, values)
            if self.group_names is not None:
                by_labels.setdefault(id(group[0][3]), []).append((group, norms, strength))
        for parts in by_labels.values():
            self._group_rows(parts)

    def _strength(self, group: list[tuple], values: torch.Tensor) -> torch.Tensor | None:
        """``modulation_strength`` ``(pairs, B)`` of every component with both gamma and
        beta here (None when there is none)."""
        where = {(c, kind): i for i, (c, kind, _, _) in enumerate(group)}
        pairs = [(where[(c, "gamma")], where[(c, "beta")], c) for c, kind, _, _ in group
                 if kind == "gamma" and (c, "beta") in where]
        if not pairs:
            return None
        sq = values.square().mean(dim=2)  # (n, B)
        strength = (sq[[g for g, _, _ in pairs]] + sq[[b for _, b, _ in pairs]]).sqrt()
        self.events.slots.update_rows(
            joined_names([self._names[c]["strength"] for _, _, c in pairs]),
            stats.rows_of_samples(strength))
        return strength

    def _group_rows(self, parts: list[tuple]) -> None:
        """Each sample's norms and strength, averaged over every component of this pass
        (both encoders), into its group's slots. ``parts``: ``(group, norms, strength)``
        of the calls made under one set of labels."""
        labels = parts[0][0][0][3]
        columns = {}
        for kind, metric in (("gamma", "gamma_norm"), ("beta", "beta_norm")):
            columns[metric] = [norms[[i for i, it in enumerate(group) if it[1] == kind]]
                               for group, norms, _ in parts if any(it[1] == kind for it in group)]
        columns["modulation_strength"] = [s for _, _, s in parts if s is not None]
        joined = {m: torch.cat(v) for m, v in columns.items()
                  if v and len({t.shape[1] for t in v}) == 1}
        if len(joined) == 3 and len({t.shape for t in joined.values()}) == 1:  # one call
            self.add_group_rows(OVERALL, torch.stack([joined[m].T for m in OVERALL]),
                                labels=labels)
            return
        for metric, values in columns.items():
            if metric in joined:
                self.add_group_rows((metric,), joined[metric].T.unsqueeze(0), labels=labels)
            else:  # batches differ: not one sample each (add_group_rows says so)
                for v in values:
                    self.add_group_rows((metric,), v.T.unsqueeze(0), labels=labels)

    def get_summary(self) -> dict:
        """Last compact record: overall ``gamma_norm``, ``beta_norm``,
        ``modulation_strength`` and every metric per component."""
        return by_group(self.last_metrics, self.last_step, OVERALL, self.components,
                        EVENT_METRICS, "by_component")
