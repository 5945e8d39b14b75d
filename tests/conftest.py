"""Shared fixtures: every test starts from a fresh Dynamo state, zeroed counters and a fixed seed."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def grouter_logs(caplog):
    """Capture the ``grouter_pass`` loggers at INFO."""
    caplog.set_level(logging.INFO, logger="grouter_pass")
    return caplog
