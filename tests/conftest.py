import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
# the data check's report cache goes to a fresh folder per test run, not to the user's ~/.cache
import tempfile  # noqa: E402
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="weakseg-test-cache-")

import torch  # noqa: E402

# tiny models: one intra-op thread is fastest, and a second thread waiting for a busy core on a shared machine
# made steps ~10x slower here
torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*predict_dataloader.*")


import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bench_oracle():
    """``benchmarks/oracle.py`` (the bound modules the benchmarks run; not part of the package), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "oracle.py"
    spec = importlib.util.spec_from_file_location("bench_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
