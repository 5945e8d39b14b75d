import numpy as np
import pytest
import torch
from torch import nn

from grouter_pass.router import DistillConfig, GrouterModelConfig, RouterTeacher, TokenizedCorpus, distill
from grouter_pass.testing.handwritten import BatchedGatherMoE

V, H, E, K = 8, 32, 4, 2


class NeighbourMoELM(nn.Module):
    """A synthetic source MoE whose first router reads a known function of each token and its two
    neighbours: ``x_t = e[id_t] + p[id_{t-1}] + n[id_{t+1}]``, ``logits_t = x_t @ W``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.prev, self.next = nn.Embedding(V, H), nn.Embedding(V, H), nn.Embedding(V, H)
        self.moe = BatchedGatherMoE(hidden=H, ffn=16, experts=E, top_k=K)
        self.head = nn.Linear(H, V, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def router_input(self, ids: torch.Tensor) -> torch.Tensor:
        p, n = self.prev(ids), self.next(ids)
        zero = torch.zeros_like(p[:, :1])
        return self.embed(ids) + torch.cat([zero, p[:, :-1]], 1) + torch.cat([n[:, 1:], zero], 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.router_input(input_ids)
        return self.head(h + self.moe(h))


def random_corpus(n: int, seed: int, vocab: int = V) -> TokenizedCorpus:
    tokens = np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)
    return TokenizedCorpus(tokens, np.array([0, n]), vocab, source=f"random{seed}")


def test_distillation_matches_a_neighbour_dependent_teacher():
    torch.manual_seed(0)
    source = NeighbourMoELM().eval()
    teacher = RouterTeacher(source, keep_hidden=True)
    ids = torch.randint(0, V, (16, 32))   # the training shape: one compile for the whole test
    # the detection pass found the router: it captured the router's input and its full-E logits
    cap = teacher.capture(ids)
    torch.testing.assert_close(cap.hidden, source.router_input(ids))
    torch.testing.assert_close(cap.logits, source.router_input(ids) @ source.moe.router)
    assert (teacher.num_experts, teacher.top_k, teacher.module_path) == (E, K, "moe")
    with pytest.raises(ValueError, match="token id 8 is outside the source model's vocab_size=8"):
        teacher(torch.tensor([[1, 8]]))

    config = GrouterModelConfig(vocab_size=V, hidden_size=64, num_heads=4, num_layers=2, intermediate_size=64,
                                num_experts=E, top_k=K, rope_theta=10.0)
    settings = DistillConfig(steps=280, batch_size=16, seq_len=32, lr=4e-3, warmup=20, save_every=0, eval_tokens=8192)
    grouter, result = distill(teacher, config, random_corpus(200_000, 1), random_corpus(8192, 2), settings,
                              progress=False)
    assert result.tokens == 8192
    assert result.topk_agreement >= 0.95, result
    assert result.kl < 0.02, result


def linear_teacher(vocab: int = 16, experts: int = 4):
    w = torch.randn(vocab, experts, generator=torch.Generator().manual_seed(3))
    return lambda ids: w[ids] + 0.5 * torch.roll(w[ids], 1, dims=1)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    config = GrouterModelConfig(vocab_size=16, hidden_size=16, num_heads=2, num_layers=1, intermediate_size=16,
                                num_experts=4, top_k=2)
    settings = DistillConfig(steps=7, batch_size=2, seq_len=16, lr=1e-2, warmup=2, save_every=3, eval_tokens=64)
    train, val = random_corpus(3000, 1, 16), random_corpus(256, 2, 16)
    full, full_eval = distill(linear_teacher(), config, train, val, settings, progress=False)

    class Interrupt(Exception):
        pass

    def crash_at_5(step, loss):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(linear_teacher(), config, train, val, settings, out_dir=tmp_path, progress=False, on_step=crash_at_5)
    assert (tmp_path / "checkpoint" / "trainer_state.pt").exists()   # step 3's checkpoint
    torch.manual_seed(123)   # the resumed run must not depend on the process's RNG state
    resumed, resumed_eval = distill(linear_teacher(), config, train, val, settings, out_dir=tmp_path,
                                    progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert full_eval.kl == resumed_eval.kl
    assert (tmp_path / "model.safetensors").exists()
    # other settings cannot silently continue this run
    with pytest.raises(ValueError, match="checkpoint was made with other settings .*lr"):
        distill(linear_teacher(), config, train, val, DistillConfig(**{**settings.__dict__, "lr": 1e-3}),
                out_dir=tmp_path, progress=False)


def test_expert_count_mismatch_with_teacher():
    config = GrouterModelConfig(vocab_size=16, hidden_size=16, num_heads=2, num_layers=1, intermediate_size=16,
                                num_experts=6, top_k=2)
    with pytest.raises(ValueError, match="teacher router has num_experts=4 but the Grouter config has num_experts=6"):
        distill(linear_teacher(), config, random_corpus(3000, 1, 16), None,
                DistillConfig(steps=1, batch_size=1, seq_len=8), progress=False)


class _RefusesToRun(nn.Module):
    """Stands for everything after the first router (later layers, a 151936-row LM head)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the teacher ran the model past its first router")


def test_the_teacher_stops_at_the_first_router():
    """Nothing after the first MoE router runs: not the experts, not the head. The captured
    logits are the router's, exactly."""
    torch.manual_seed(0)
    source = NeighbourMoELM().eval()
    source.head = _RefusesToRun()
    teacher = RouterTeacher(source)
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(teacher(ids), source.router_input(ids) @ source.moe.router)
    torch.testing.assert_close(teacher(ids[:, :5]), source.router_input(ids[:, :5]) @ source.moe.router)


def test_the_teacher_probes_on_the_source_weights_not_random_copies(monkeypatch, caplog):
    """Above the probe's budget (the experts of a Qwen3-30B-A3B layer are 1.2 GB), the probe reads
    the source's own expert weights: the teacher hands the backend's real inputs to detection. A
    random copy of every expert weight would be allocated at compile time otherwise (the largest
    part of a distillation's peak memory at that size)."""
    from grouter_pass.passes.probe_weights import ProbeWeights

    of, real = ProbeWeights.of.__func__, ProbeWeights.real
    used = []
    monkeypatch.setattr(ProbeWeights, "of", classmethod(lambda cls, gm, ex, budget: of(cls, gm, ex, 0)))
    monkeypatch.setattr(ProbeWeights, "real", lambda self, nodes, e: used.append(real(self, nodes, e)) or used[-1])
    torch.manual_seed(0)
    source = NeighbourMoELM().eval()
    teacher = RouterTeacher(source)
    ids = torch.randint(0, V, (3, 7))
    caplog.set_level("WARNING", logger="grouter_pass")
    torch.testing.assert_close(teacher(ids), source.router_input(ids) @ source.moe.router)
    assert "random copies" not in caplog.text
    assert used and all(r is not None for r in used), used
    weights = {p.data_ptr() for p in source.moe.parameters()}
    assert any(t.data_ptr() in weights for r in used for t in r)
