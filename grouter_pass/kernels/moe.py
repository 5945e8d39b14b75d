"""The routed-experts forward and backward composed from the Triton kernels.

Same arguments and results as :func:`grouter_pass.ops.reference.moe_experts_reference` and
:func:`~grouter_pass.ops.reference.moe_experts_backward_reference`, for the configurations
:func:`unsupported_reason` accepts (the others run the reference). Launches, forward:
``up_act`` (gather + GEMM + activation) and ``down_combine`` (GEMM + weight + scatter);
backward: ``down_backward`` (gather + GEMM + activation backward + routing-weight gradient),
two ``grouped_weight_grad`` and one ``down_combine`` for the input gradient. Nothing reads a
device value on the host; bias gradients are segment sums in torch.

Troubleshooting: ``GROUTER_TRITON_AUTOTUNE=0`` disables autotuning
(:mod:`grouter_pass.kernels.autotune`); fp32 GEMMs use IEEE products unless ``allow_tf32``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from grouter_pass.kernels.grouped_gemm_backward_kernels import down_backward, grouped_weight_grad
from grouter_pass.kernels.grouped_gemm_kernels import down_combine, linear_strides, up_act
from grouter_pass.kernels.triton_utils import ACTIVATIONS
from grouter_pass.spec import ExpertMLP

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _identity(kernel):
    return kernel


def expert_of_row(offsets_E: torch.Tensor, rows: int) -> torch.Tensor:
    """Expert of each row of an expert-ordered ``[S, ...]`` tensor (int64 ``[S]``), on device."""
    return torch.searchsorted(offsets_E.to(torch.int64), torch.arange(rows, device=offsets_E.device), right=True)


def unsupported_reason(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *, activation: str,
                       weight_on_input: bool) -> str | None:
    """Why the kernels cannot run this configuration, or None when they can."""
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} has no fused epilogue"
    if weight_on_input:
        return "routing weight on the expert input (Llama 4 style) is not fused"
    if w_up.dtype not in _DTYPES or w_down.dtype != w_up.dtype:
        return f"expert weights {w_up.dtype}/{w_down.dtype}: need one of fp32, fp16, bf16 for both"
    if x.dim() != 2:
        return f"x must be [N, H], got {tuple(x.shape)}"
    return None


def moe_experts_triton(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, *, mlp: ExpertMLP,
                       out_dtype: torch.dtype | None, allow_tf32: bool = False, wrap: Callable = _identity
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [N, H], h [S, O])``, as the reference (``mlp.alpha`` / ``limit`` are not read:
    :func:`unsupported` keeps ``clamped_swiglu`` on the reference)."""
    n, hidden = x.shape
    k = weights.shape[1]
    weights_S = weights.reshape(-1).contiguous()
    h, a = up_act(x, perm, offsets, w_up, b_up, top_k=k, activation=mlp.activation, gated=mlp.gated,
                  interleaved=mlp.interleaved, up_transposed=mlp.up_transposed, allow_tf32=allow_tf32, wrap=wrap)
    s_e, s_out, s_in = linear_strides(w_down, mlp.down_transposed)
    out = down_combine(a, perm, offsets, w_down, b_down, weights_S, n, top_k=k, w_strides=(s_e, s_in, s_out),
                       hidden=hidden, allow_tf32=allow_tf32, wrap=wrap)
    return out.to(x.dtype if out_dtype is None else out_dtype), h


def moe_experts_backward_triton(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, *,
                                mlp: ExpertMLP, needs: Sequence[bool] = (True,) * 6, allow_tf32: bool = False,
                                wrap: Callable = _identity) -> tuple[torch.Tensor | None, ...]:
    """Backward: gradients of ``(x, weights, w_up, w_down, b_up, b_down)`` (None where not needed)."""
    need_x, need_w, need_up, need_down, need_bup, need_bdown = needs
    n, hidden = x.shape
    k = weights.shape[1]
    weights_S = weights.reshape(-1).contiguous()
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    gh, a, gw_sorted = down_backward(grad_out, perm, offsets, w_down, h, weights_S, top_k=k,
                                     activation=mlp.activation, gated=mlp.gated, interleaved=mlp.interleaved,
                                     down_transposed=mlp.down_transposed, need_gw=need_w, allow_tf32=allow_tf32,
                                     wrap=wrap)
    rows_expert = None
    if b_down is not None and (need_w or need_bdown) or b_up is not None and need_bup:
        rows_expert = expert_of_row(offsets, perm.numel())
    g_rows = None
    if b_down is not None and (need_w or need_bdown):
        g_rows = grad_out.index_select(0, perm // k).float()
    grad_weights = None
    if need_w:
        if b_down is not None:  # y = a W^T + b: <g, y> also has <g, b_e>
            gw_sorted = gw_sorted + (g_rows * b_down.float().index_select(0, rows_expert)).sum(-1)
        grad_weights = gw_sorted.index_select(0, inv_perm).view(n, k).to(weights.dtype)
    grad_w_down = grad_b_down = grad_w_up = grad_b_up = grad_x = None
    if need_down:
        grad_w_down = torch.empty_like(w_down)
        s_e, s_out, s_in = linear_strides(grad_w_down, mlp.down_transposed)
        grouped_weight_grad(grad_out, a, perm, weights_S, offsets, grad_w_down, (s_e, s_out, s_in), top_k=k,
                            allow_tf32=allow_tf32, wrap=wrap)
    if need_bdown and b_down is not None:
        gy = g_rows * weights_S.index_select(0, perm).float().unsqueeze(-1)
        grad_b_down = torch.zeros(b_down.shape, dtype=torch.float32, device=x.device).index_add_(
            0, rows_expert, gy).to(b_down.dtype)
    del a
    if need_up:
        grad_w_up = torch.empty_like(w_up)
        s_e, s_out, s_in = linear_strides(grad_w_up, mlp.up_transposed)
        grouped_weight_grad(x, gh, perm, None, offsets, grad_w_up, (s_e, s_in, s_out), top_k=k,
                            allow_tf32=allow_tf32, wrap=wrap)
    if need_bup and b_up is not None:
        grad_b_up = torch.zeros(b_up.shape, dtype=torch.float32, device=x.device).index_add_(
            0, rows_expert, gh.float()).to(b_up.dtype)
    if need_x:
        s_e, s_out, s_in = linear_strides(w_up, mlp.up_transposed)
        grad_x = down_combine(gh, perm, offsets, w_up, None, None, n, top_k=k, w_strides=(s_e, s_out, s_in),
                              hidden=hidden, allow_tf32=allow_tf32, wrap=wrap).to(x.dtype)
    return grad_x, grad_weights, grad_w_up, grad_w_down, grad_b_up, grad_b_down
