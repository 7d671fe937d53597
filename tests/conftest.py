import os
from pathlib import Path

import pytest
import torch

# The tests' tensors are tiny: one thread is as fast as two, and far faster when other processes share the
# CPU (a second thread then mostly waits). Subprocesses that the tests start inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """The shared third-party data folder beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
