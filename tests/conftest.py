import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# pytest -n auto runs one worker per core: one thread each keeps them from fighting.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The longest tests first (``slow``, then ``distributed``), each group in collection
    order: with ``-n auto --dist worksteal`` the workers end on short tests, so neither
    waits for the other on a long one at the end. Deterministic, as xdist requires."""
    def weight(item):
        return 0 if item.get_closest_marker("slow") else (
            1 if item.get_closest_marker("distributed") else 2)

    items.sort(key=weight)  # stable
