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


def _load_benchmark(name: str):
    """``benchmarks/<name>.py`` (benchmark scripts and the bound modules they run; not part of the package), loaded
    by path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """The loader of ``benchmarks/<name>.py`` by name."""
    return _load_benchmark


@pytest.fixture(scope="session")
def bench_oracle():
    """``benchmarks/oracle.py``: the bound modules the benchmarks run."""
    return _load_benchmark("oracle")
