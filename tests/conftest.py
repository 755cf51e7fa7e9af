import os

import pytest

# Tests never reach the network: wandb offline, Hugging Face offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS = os.path.dirname(__file__)
TINY_CONFIG = os.path.join(TESTS, "configs", "tiny.yaml")


@pytest.fixture
def tiny_config():
    return TINY_CONFIG
