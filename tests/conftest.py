import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO.parent / "shared" / "reference" / "state_dict_manifest.json"


@pytest.fixture(scope="session")
def manifest():
    """Key -> shape of the reference checkpoints (shared/reference/state_dict_manifest.json)."""
    if not MANIFEST.is_file():
        pytest.fail(f"reference manifest not found at {MANIFEST}: the tests expect shared/ beside the repo")
    return json.loads(MANIFEST.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
