"""DDP's graph splitting (``optimize_ddp``): a model DDPOptimizer compiles in pieces gets a
warning that says why its MoE layers were left unchanged and what to set; with the graph kept
whole (``optimize_ddp=False``) every layer is rewritten and training matches eager DDP."""

import functools
import logging

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from grouter_pass import GrouterBackend, GrouterConfig
from grouter_pass.testing.handwritten import DenseBmmMoE, TinyMoELM


@pytest.fixture
def one_rank_group(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model(hidden: int = 192) -> torch.nn.Module:
    torch.manual_seed(0)   # 2 layers of ~0.9 MB experts: more than DDP's 1 MB first bucket
    return TinyMoELM(functools.partial(DenseBmmMoE, hidden=hidden, ffn=hidden), layers=2, hidden=hidden)


def _step(model, ids):
    out = model(ids)
    out.float().pow(2).mean().backward()
    named = (model._orig_mod if hasattr(model, "_orig_mod") else model).module.named_parameters()
    return out.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}


def test_a_graph_ddp_splits_is_left_alone_with_a_warning_that_says_what_to_set(one_rank_group, caplog):
    ddp = DDP(_model())
    backend = GrouterBackend(GrouterConfig(compiler="aot_eager"))
    ids = torch.randint(0, 97, (2, 5))
    with caplog.at_level(logging.WARNING, logger="grouter_pass.integrations.ddp"):
        torch.compile(ddp, backend=backend)(ids)
    assert len(backend.reports) > 1, "DDPOptimizer did not split the graph"
    warnings = [r.getMessage() for r in caplog.records if r.name == "grouter_pass.integrations.ddp"]
    assert len(warnings) == 1, warnings   # once per DDP module, not once per piece
    assert "optimize_ddp = False" in warnings[0] and "left unchanged" in warnings[0]


def test_with_the_graph_kept_whole_every_layer_is_rewritten_and_matches_eager_ddp(one_rank_group, caplog):
    ids = torch.randint(0, 97, (2, 5))
    want_out, want_grads = _step(DDP(_model()), ids)
    backend = GrouterBackend(GrouterConfig(compiler="aot_eager"))
    with torch._dynamo.config.patch(optimize_ddp=False), \
            caplog.at_level(logging.WARNING, logger="grouter_pass.integrations.ddp"):
        got_out, got_grads = _step(torch.compile(DDP(_model()), backend=backend), ids)
    assert [len(r.rewritten) for r in backend.reports] == [2]
    assert not [r for r in caplog.records if r.name == "grouter_pass.integrations.ddp"]
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
