"""Nothing outside the rewrite changes: a user's other compiled functions, the buffers of their
blocks and the gradients their optimizer sees are as they would be without the pass."""

import copy

import torch
from torch import nn

from grouter_pass import GrouterConfig, apply_grouter, explain
from grouter_pass.testing.handwritten import LoopMoE
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids


class _CountingBackend:
    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_apply_grouter_and_explain_leave_other_compiled_functions_compiled():
    other = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    backend = _CountingBackend()
    compiled_other = torch.compile(other, backend=backend)
    x = torch.randn(3, 8)
    compiled_other(x)
    assert backend.compiles == 1

    # a loop-style block (graph breaks counted before and after its rewrite) and an HF model
    loop = nn.Sequential(LoopMoE(hidden=16, ffn=12, experts=4, top_k=2))
    apply_grouter(loop, GrouterConfig(compiler="eager"))(torch.randn(2, 3, 16))
    hf = tiny_hf_moe("qwen3_moe")
    ids = tiny_token_ids()
    apply_grouter(hf, GrouterConfig(compiler="eager"))(ids)
    explain(copy.deepcopy(loop), torch.randn(2, 3, 16))

    compiled_other(x)
    assert backend.compiles == 1, "the user's compiled function was recompiled: Dynamo was reset"


class LoadCountingLoopMoE(LoopMoE):
    """A loop-style block that keeps tokens-per-expert statistics in a buffer, as load-balancing
    code does."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.register_buffer("load", torch.zeros(self.num_experts))

    def forward(self, hidden_states):
        out, logits = super().forward(hidden_states)
        ids = logits.topk(self.top_k, dim=-1).indices
        self.load += torch.bincount(ids.reshape(-1), minlength=self.num_experts).to(self.load.dtype)
        return out, logits


def test_a_block_that_updates_its_buffers_is_left_alone_and_probing_leaves_them_untouched(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(LoadCountingLoopMoE(hidden=16, ffn=12, experts=4, top_k=2))
    reference = copy.deepcopy(model)
    compiled = apply_grouter(model, GrouterConfig(compiler="eager"))
    assert torch.equal(model[0].load, reference[0].load), "probing wrote into the user's buffer"
    (report,) = compiled._grouter_prepared.loop_blocks
    assert not report.rewritten and "updates its buffers ['load']" in report.reason
    x = torch.randn(2, 5, 16)
    compiled(x)
    reference(x)
    assert torch.equal(model[0].load, reference[0].load) and model[0].load.sum() == 2 * 5 * 2


def _skewed_tokens(model: nn.Module, hidden: int) -> torch.Tensor:
    """Tokens that all pick the same top-2 experts, so the other experts get none."""
    gate = model[0].gate.weight.detach()
    return (gate[0] + gate[1]).repeat(1, 6, 1) * 10 + 0.01 * torch.randn(1, 6, hidden)


def test_experts_without_tokens_keep_none_gradients_and_adamw_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(LoopMoE(hidden=16, ffn=12, experts=4, top_k=2))
    reference = copy.deepcopy(model)
    compiled = apply_grouter(model, GrouterConfig(compiler="eager"))
    assert compiled._grouter_prepared.loop_blocks[0].rewritten
    x = _skewed_tokens(model, 16)
    ids = reference[0].gate(x).topk(2, dim=-1).indices.unique()
    assert len(ids) < 4, "the input must leave some expert without tokens"

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        for m, o in ((compiled, opt), (reference, opt_ref)):
            o.zero_grad(set_to_none=True)
            out, _ = m(x)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        got = {n: p.grad is None for n, p in model.named_parameters()}
        want = {n: p.grad is None for n, p in reference.named_parameters()}
        assert got == want and any(want.values())
        for (n, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
        opt.step()
        opt_ref.step()
    # AdamW skipped the experts that got no tokens (no weight decay, no momentum), as in eager
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        if want[n]:
            assert torch.equal(p, q), n


def test_the_kernel_choice_is_in_every_cache_key(monkeypatch):
    """``GROUTER_KERNELS`` decides how Inductor lowers the grouter ops, so the FX graph cache must
    see it: the pre-grad hook's uuid and the key the grouter backend adds both change with it."""
    from grouter_pass import GrouterPreGradPass
    from grouter_pass.integrations.inductor import KernelChoiceKey

    hook, key = GrouterPreGradPass(), KernelChoiceKey()
    monkeypatch.setenv("GROUTER_KERNELS", "auto")
    before = hook.uuid(), key.uuid()
    monkeypatch.setenv("GROUTER_KERNELS", "reference")
    after = hook.uuid(), key.uuid()
    assert before[0] != after[0] and before[1] != after[1]
    assert KernelChoiceKey(GrouterPreGradPass()).uuid() != KernelChoiceKey().uuid()
    assert KernelChoiceKey(lambda graph: None).uuid() is None   # an unkeyed user pass: Inductor bypasses the cache


def test_the_grouter_backend_compiles_through_inductor_with_the_kernel_key(monkeypatch):
    import torch._inductor.compile_fx as inductor

    from grouter_pass.integrations.inductor import KernelChoiceKey

    seen = []
    real = inductor.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.append(config_patches)
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(inductor, "compile_fx", spy)
    model = nn.Sequential(LoopMoE(hidden=16, ffn=12, experts=4, top_k=2))
    x = torch.randn(2, 3, 16)
    want, _ = copy.deepcopy(model)(x)
    got, _ = apply_grouter(model, GrouterConfig())(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    outer = [p for p in seen if p is not None]   # compile_fx calls itself again once the patches are applied
    assert outer and all(isinstance(p["pre_grad_custom_pass"], KernelChoiceKey) for p in outer)


class JitterLoopMoE(LoopMoE):
    """Router jitter in training: the forward draws from the global generator."""

    def forward(self, hidden_states):
        if self.training:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(0.99, 1.01)
        return super().forward(hidden_states)


def test_probing_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    model = nn.Sequential(JitterLoopMoE(hidden=16, ffn=12, experts=4, top_k=2))   # built before the seed below
    torch.manual_seed(123)
    compiled = apply_grouter(model, GrouterConfig(compiler="eager"))
    (report,) = compiled._grouter_prepared.loop_blocks
    assert "random in training" in report.reason   # probed (several runs), then left alone
    assert torch.equal(torch.rand(4), expected), "apply_grouter advanced the user's random generator"
