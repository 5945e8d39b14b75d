"""Tiny, randomly initialised MoE models for tests, examples and benchmarks (no downloads).

Every dimension is distinct (hidden 64, routed-expert FFN 48, shared-expert FFN 40, dense FFN
80, 8 experts, top-2) so that each size can be told apart in FX shape metadata. Zero-initialised
routing buffers (DeepSeek's ``e_score_correction_bias``) are filled with small random values so
that they actually change the selection.
"""

from __future__ import annotations

from typing import Any

import torch

HIDDEN, MOE_FFN, SHARED_FFN, DENSE_FFN = 64, 48, 40, 80
NUM_EXPERTS, TOP_K, VOCAB = 8, 2, 97

_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)

#: transformers ``model_type`` -> config overrides of the tiny model. Keys are the HF model types
#: so that the CLI and tests can build any of them by name.
HF_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=MOE_FFN, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K),
    "qwen2_moe": dict(intermediate_size=DENSE_FFN, moe_intermediate_size=MOE_FFN,
                      shared_expert_intermediate_size=SHARED_FFN, num_experts=NUM_EXPERTS,
                      num_experts_per_tok=TOP_K, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=DENSE_FFN, moe_intermediate_size=MOE_FFN, num_experts=NUM_EXPERTS,
                      num_experts_per_tok=TOP_K, norm_topk_prob=True, head_dim=16),
    "olmoe": dict(intermediate_size=MOE_FFN, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K),
    "deepseek_v3": dict(intermediate_size=DENSE_FFN, moe_intermediate_size=MOE_FFN, n_routed_experts=NUM_EXPERTS,
                        num_experts_per_tok=TOP_K, n_group=4, topk_group=2, n_shared_experts=1,
                        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, num_key_value_heads=4),
    # group-limited greedy: groups ranked by their best expert (a max), softmax scores, scaled
    "deepseek_v2": dict(intermediate_size=DENSE_FFN, moe_intermediate_size=MOE_FFN, n_routed_experts=NUM_EXPERTS,
                        num_experts_per_tok=TOP_K, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                        n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5,
                        num_key_value_heads=4),
    "gpt_oss": dict(intermediate_size=MOE_FFN, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                    head_dim=16, sliding_window=16, layer_types=["full_attention", "sliding_attention"]),
    "glm4_moe": dict(intermediate_size=DENSE_FFN, moe_intermediate_size=MOE_FFN, n_routed_experts=NUM_EXPERTS,
                     num_experts_per_tok=TOP_K, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
                     routed_scaling_factor=1.0, head_dim=16),
    "ernie4_5_moe": dict(intermediate_size=DENSE_FFN, moe_intermediate_size=MOE_FFN, moe_num_experts=NUM_EXPERTS,
                         moe_k=TOP_K, moe_num_shared_experts=1, moe_layer_start_index=0),
    "granitemoe": dict(intermediate_size=MOE_FFN, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K),
    # layer 0 is a Mamba layer, layer 1 attention; both have MoE feed-forwards
    "jamba": dict(intermediate_size=MOE_FFN, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, expert_layer_period=1,
                  expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
                  mamba_d_state=4, mamba_d_conv=2, mamba_expand=1),
    # top-1, dense experts on every token, an MLP shared expert
    "llama4_text": dict(intermediate_size=MOE_FFN, intermediate_size_mlp=DENSE_FFN, num_local_experts=NUM_EXPERTS,
                        num_experts_per_tok=1, interleave_moe_layer_step=1, head_dim=16, attention_chunk_size=16,
                        use_qk_norm=False, no_rope_layers=[1, 1]),
    "phimoe": dict(intermediate_size=MOE_FFN, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                   router_jitter_noise=0.01),
    # DBRX has its own expert loop (no experts interface); its attention config needs rope_theta
    # and clip_qkv to build from a config in transformers 5.24
    "dbrx": dict(d_model=HIDDEN, n_heads=4, n_layers=2, max_seq_len=64,
                 ffn_config=dict(ffn_hidden_size=MOE_FFN, moe_num_experts=NUM_EXPERTS, moe_top_k=TOP_K),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
}




def _fill_zero_routing_buffers(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dim() == 1 and name.endswith("correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)


def _randomize_zero_params(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises some router weights / biases to zero; a zero router routes every
    token identically and would make parity tests meaningless."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.abs().max() == 0 and p.dim() <= 2 and p.numel() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def tiny_hf_config(model_type: str, **overrides: Any):
    """The tiny transformers config of ``model_type`` (see :data:`HF_TINY_CONFIGS`)."""
    from transformers import AutoConfig

    if model_type not in HF_TINY_CONFIGS:
        raise ValueError(f"no tiny config for model type {model_type!r}; known: {sorted(HF_TINY_CONFIGS)}")
    kwargs = {**_COMMON, **HF_TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_hf_moe(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                experts_implementation: str | None = None, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised causal LM of ``model_type`` with the tiny sizes above.

    Args:
        model_type: a key of :data:`HF_TINY_CONFIGS` (``"mixtral"``, ``"deepseek_v3"``...).
        experts_implementation: transformers' experts backend (default: its own default,
            ``grouped_mm``).
    """
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, **overrides)
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    _fill_zero_routing_buffers(model, seed)
    _randomize_zero_params(model, seed)
    return model.to(dtype).eval()


def tiny_token_ids(batch: int = 2, seq: int = 5, *, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


class DenseMLPModel(torch.nn.Module):
    """A small model with no MoE at all (and a top-k that is not routing): the pass must leave it
    unchanged."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.up = torch.nn.Linear(hidden, DENSE_FFN)
        self.down = torch.nn.Linear(DENSE_FFN, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.nn.functional.silu(self.up(h)))
        logits = self.head(h)
        # a top-k over vocabulary logits (sampling-style): looks like an anchor, is not a router
        top_vals, _ = torch.topk(torch.softmax(logits, dim=-1), 4, dim=-1)
        return logits, top_vals
