import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Key -> shape of the reference ear_base/large/huge and KL-16 VAE checkpoints, copied from the
# project's shared/reference folder so the suite runs on any clone.
MANIFEST = REPO / "tests" / "data" / "reference_state_dict_manifest.json"
SHARED_MANIFEST = REPO.parent / "shared" / "reference" / "state_dict_manifest.json"


@pytest.fixture(scope="session")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
