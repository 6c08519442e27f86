import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# pytest -n auto runs one worker per core: one thread each keeps them from fighting.
torch.set_num_threads(1)
