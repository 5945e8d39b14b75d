"""Device of the kernel suite: CPU tensors under the interpreter, or the GPU when
``GROUTER_TEST_DEVICE=cuda`` (``examples/gpu_check.py``): every tensor the tests create then
lands there through the default device."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _test_device():
    device = os.environ.get("GROUTER_TEST_DEVICE", "cpu")
    if device == "cpu":
        yield
        return
    with torch.device(device):
        yield
