"""Plain-torch twins of the Triton kernels: one function per launcher, same arguments, same
outputs, written for clarity (per-expert loops, materialised gathers). They are the oracle of
the kernel tests (under the interpreter, or compiled for a GPU) and the spec a kernel change must
keep; they live with the tests because no product code runs them.

Legend as in :mod:`grouter_pass.kernels.grouped_gemm_kernels`.
"""

from __future__ import annotations

import torch

from grouter_pass.ops import reference as R


def plan_reference(ids_NK: torch.Tensor, num_experts: int, pad_to: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of :func:`~grouter_pass.kernels.dispatch_kernels.dispatch_plan_triton`."""
    perm, inv_perm, counts, offsets = R.dispatch_plan_reference(ids_NK.to(torch.int64), num_experts)
    padded = ((counts + pad_to - 1) // pad_to * pad_to).cumsum(0).to(torch.int32)
    return perm, inv_perm, counts, offsets, padded


def _as_kn(w: torch.Tensor, strides: tuple[int, int, int], k: int, n: int) -> torch.Tensor:
    return w.as_strided((w.shape[0], k, n), strides)


def up_act_reference(x_NH, perm_S, offsets_E, w_up, b_up, *, top_k, activation, gated, interleaved,
                     up_transposed) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`~grouter_pass.kernels.grouped_gemm_kernels.up_act`."""
    rows = x_NH.index_select(0, perm_S // top_k).to(w_up.dtype)
    h = R.grouped_linear(rows, w_up, offsets_E, transposed=up_transposed, bias_EO=b_up)
    a = R.activation_forward(h, activation=activation, gated=gated, interleaved=interleaved, alpha=1.0, limit=0.0)
    return h, a


def down_combine_reference(a_SF, perm_S, offsets_E, w, b, weights_S, num_tokens, *, top_k, w_strides, hidden
                           ) -> torch.Tensor:
    """Twin of :func:`~grouter_pass.kernels.grouped_gemm_kernels.down_combine` (fp32 result)."""
    b_kn = _as_kn(w, w_strides, a_SF.shape[1], hidden)
    y = torch.zeros(a_SF.shape[0], hidden, dtype=torch.float32, device=a_SF.device)
    for e, s0, s1 in R._segments(offsets_E):
        y[s0:s1] = (a_SF[s0:s1].float() @ b_kn[e].float())
        if b is not None:
            y[s0:s1] += b[e].float()
    if weights_S is not None:
        y = y * weights_S.index_select(0, perm_S).float().unsqueeze(-1)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=a_SF.device)
    return out.index_add_(0, perm_S // top_k, y)


def down_backward_reference(grad_out_NH, perm_S, offsets_E, w_down, h_SO, weights_S, *, top_k, activation, gated,
                            interleaved, down_transposed, need_gw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of :func:`~grouter_pass.kernels.grouped_gemm_backward_kernels.down_backward`."""
    cdt = h_SO.dtype
    g_rows = grad_out_NH.index_select(0, perm_S // top_k).to(cdt)
    ga = R.grouped_linear(g_rows, w_down, offsets_E, transposed=not down_transposed)
    a, act_gate = R.activation_forward_saving(h_SO, activation=activation, gated=gated, interleaved=interleaved,
                                              alpha=1.0, limit=0.0)
    gw = (ga.float() * a.float()).sum(-1) if need_gw else torch.zeros(h_SO.shape[0], device=h_SO.device)
    gaw = (ga.float() * weights_S.index_select(0, perm_S).float().unsqueeze(-1)).to(cdt)
    gh = R.activation_backward(gaw, h_SO, activation=activation, gated=gated, interleaved=interleaved, alpha=1.0,
                               limit=0.0, act_gate=act_gate)
    return gh, a, gw


def grouped_weight_grad_reference(a_src, b_SN, perm_S, weights_S, offsets_E, out, out_strides, *, top_k
                                  ) -> torch.Tensor:
    """Twin of :func:`~grouter_pass.kernels.grouped_gemm_backward_kernels.grouped_weight_grad`."""
    rows = a_src if perm_S is None else a_src.index_select(0, perm_S // top_k)
    if weights_S is not None:
        rows = (rows.float() * weights_S.index_select(0, perm_S).float().unsqueeze(-1))
    rows = rows.to(b_SN.dtype)
    view = out.as_strided((out.shape[0], a_src.shape[1], b_SN.shape[1]), out_strides)
    view.zero_()
    for e, s0, s1 in R._segments(offsets_E):
        view[e] = (rows[s0:s1].float().t() @ b_SN[s0:s1].float()).to(out.dtype)
    return out
