"""Shared fixtures. The suite runs fully offline (SPEC §6): no Hub access, local paths only."""
import os
import sys
from pathlib import Path

# Before anything imports transformers/datasets/huggingface_hub: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Let `pytest` (not only `python -m pytest`) import the in-tree package without an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a float32 HF folder, converted at most once per session
    (~20 s). Set AMCT_HF_CACHE to reuse a persistent cache across sessions."""
    from amct_hf.assets import smollm2_folder

    cache = os.environ.get("AMCT_HF_CACHE") or tmp_path_factory.mktemp("amct_hf_cache")
    return smollm2_folder(cache_dir=cache)
