"""The named model sizes must be checkpoint-compatible with the reference release."""
import json

import pytest
import torch

from conftest import SHARED_MANIFEST
from models.ear import ear_models

PARAMS_M = {"ear_base": 205.6, "ear_large": 474.8, "ear_huge": 937.3}


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_state_dict_matches_reference(name, manifest):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = ear_models[name]()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    ref = [(k, list(v)) for k, v in manifest[name].items()]
    assert {k for k, _ in ours} - {k for k, _ in ref} == set(), "keys the reference lacks"
    assert {k for k, _ in ref} - {k for k, _ in ours} == set(), "reference keys we lack"
    assert ours == ref  # same shapes, same order
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 1) == PARAMS_M[name]


@pytest.mark.skipif(not SHARED_MANIFEST.is_file(), reason="no shared/ folder beside this clone")
def test_vendored_manifest_is_the_shared_one(manifest):
    assert manifest == json.loads(SHARED_MANIFEST.read_text())
