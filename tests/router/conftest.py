"""Router tests: tiny Grouters on one thread (the CI machine's cores are shared; at these sizes
one thread is faster than two fighting over the same cores)."""

import pytest
import torch

from grouter_pass.router import Grouter, GrouterModelConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> GrouterModelConfig:
    kw = dict(vocab_size=32, hidden_size=16, num_heads=2, num_layers=2, intermediate_size=24, num_experts=8, top_k=2,
              rope_theta=100.0)
    kw.update(overrides)
    return GrouterModelConfig(**kw)


def tiny_grouter(seed: int = 0, **overrides) -> Grouter:
    torch.manual_seed(seed)
    g = Grouter(tiny_config(**overrides))
    with torch.no_grad():  # larger score rows than the 0.02 init, so routing is not near-uniform
        g.score.weight.normal_(0, 1.0)
    return g.eval()
