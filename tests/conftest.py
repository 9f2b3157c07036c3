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
