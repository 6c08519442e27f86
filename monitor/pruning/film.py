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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monitor import stats
from monitor.observer import Observer
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
    """

    part = "film"
    overall_metrics = OVERALL

    def __init__(self, session: MonitorSession, components: Sequence[str] = (), *,
                 event_interval: int = 10, detailed_interval: int = 500,
                 hist_edges: Sequence[float] = DEFAULT_EDGES) -> None:
        super().__init__(session, event_interval=event_interval,
                         detailed_interval=detailed_interval)
        self._edges = [float(e) for e in hist_edges]
        self.components: list[str] = []
        self._names: dict[str, dict[str, tuple]] = {}
        self._half: dict[str, tuple[str, torch.Tensor]] = {}
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
        """Gamma and/or beta of one FiLM call, ``(B, width)`` (more leading dims allowed)."""
        for kind, value in (("gamma", gamma), ("beta", beta)):
            if value is None:
                continue
            value = value.detach().to(stats.DTYPE).reshape(-1, value.shape[-1])
            self._one(component, kind, value)
            self._pair(component, kind, value)

    def _one(self, component: str, kind: str, value: torch.Tensor) -> None:
        names = self._names[component]
        rows = torch.cat([stats.row_of_samples(value), stats.row_of_samples(value.norm(dim=1))])
        self.events.slots.update_rows(names[kind], rows)
        self.add_to_histogram(names[f"{kind}_hist"], value)

    def _pair(self, component: str, kind: str, value: torch.Tensor) -> None:
        other = self._half.pop(component, None)
        if other is None or other[0] == kind or other[1].shape != value.shape:
            self._half[component] = (kind, value)
            return
        sq = value.square().mean(dim=1) + other[1].square().mean(dim=1)
        self.events.slots.update_rows(self._names[component]["strength"],
                                      stats.row_of_samples(sq.sqrt()))

    def get_summary(self) -> dict:
        """Last compact record: overall ``gamma_norm``, ``beta_norm``,
        ``modulation_strength`` and every metric per component."""
        return by_group(self.last_metrics, self.last_step, OVERALL, self.components,
                        EVENT_METRICS, "by_component")
