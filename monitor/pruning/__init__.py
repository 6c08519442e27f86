"""Generic observers of routing and modulation inside a model (no model-specific code).

The package is called ``pruning`` because CogVLA's token routing (LFP) prunes tokens and the
public training script imports every observer, FiLM, MoE and aggregation included, from
``monitor.pruning``: those import paths are fixed by that script, so they all live here.

* :class:`PruningObserver`: token routing per layer (keep ratio, keep probabilities,
  top-k margin, overlap of kept sets).
* :class:`FiLMObserver`: FiLM gamma/beta per sampled layer.
* :class:`MoERouterObserver`: dense expert mixing weights, entropy, collapse alerts.
* :class:`AggregationObserver`: token compression by aggregation tokens.

Adapters (``monitor.pruning.adapters``) find the modules of a given model and feed these
observers; ``monitor.pruning.adapters.cogvla.CogVLAMonitoring`` is the one-object facade
for CogVLA. See ``monitor/pruning/README.md`` for every key.
"""

from monitor.pruning.aggregation import AggregationObserver
from monitor.pruning.film import FiLMObserver
from monitor.pruning.moe import MoERouterObserver
from monitor.pruning.routing import PruningObserver

__all__ = ["AggregationObserver", "FiLMObserver", "MoERouterObserver", "PruningObserver"]
