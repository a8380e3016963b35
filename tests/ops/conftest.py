import os

import pytest
import torch

import surgery.ops as ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def require_extension(request):
    """With SURGERY_REQUIRE_EXTENSION=1 (CI), an op test that would fall back to the reference path fails."""
    if os.environ.get("SURGERY_REQUIRE_EXTENSION") == "1":
        dev = request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"
        assert ops.backend(dev) == "extension", f"surgery._C did not provide the {dev} kernels"
