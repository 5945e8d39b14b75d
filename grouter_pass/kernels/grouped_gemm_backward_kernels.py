"""Backward grouped GEMMs: the combine's backward fused into dA, and the weight gradients.

Legend as in :mod:`grouter_pass.kernels.grouped_gemm_kernels`.

``_down_backward_kernel``  rows of ``grad_out`` read through ``perm`` (the combine's backward
    is this gather) times ``W_down`` -> ``ga [rows, F]``; epilogue recomputes ``a`` from the
    saved ``h`` (stored for dW_down), adds the routing-weight gradient ``<ga, a>`` of each
    slot (fp32 atomics across N tiles), multiplies by the routing weight and applies the
    activation's backward -> ``gh [S, O]``.
``_grouped_dw_kernel``  ``dW[e] = A[rows_e]^T B[rows_e]`` for every expert, reducing over the
    expert's rows; ``A``'s rows may be gathered through ``perm`` (tokens) and scaled by the
    routing weight, so neither the gathered ``x`` nor ``w * grad_out`` is materialised. The
    result is stored through strides, which covers both weight layouts. Experts without rows
    get zeros.

The input gradient is the forward's ``_down_combine_kernel`` with ``B = W_up`` and no weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from grouter_pass.kernels.autotune import DW_CONFIGS, GEMM_CONFIGS, triton_configs
from grouter_pass.kernels.grouped_gemm_kernels import dot_precision, launch
from grouter_pass.kernels.triton_utils import ACTIVATIONS, act_bwd, act_fwd, expert_tile, mma, num_m_tiles

_KEY = ["E", "TOPK", "HID", "FFN"]


@triton.jit
def _down_backward_kernel(
    g_ptr, perm_ptr, w_ptr, h_ptr, rw_ptr, offsets_ptr, gh_ptr, a_ptr, gw_ptr,
    E, TOPK, HID, FFN,
    stride_gn, stride_we, stride_wk, stride_wn, stride_hs, stride_as,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, NEED_GW: tl.constexpr,
    PRECISION: tl.constexpr, E_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, row0, row_end = expert_tile(offsets_ptr, E, tl.program_id(0), BLOCK_M, E_P2)
    if expert >= E:
        return
    rm = row0 + tl.arange(0, BLOCK_M)
    mmask = rm < row_end
    rows = rm.to(tl.int64)
    slot = tl.load(perm_ptr + rm, mask=mmask, other=0)
    tok = (slot // TOPK).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < FFN
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < HID
        b = tl.load(w_base + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        g = tl.load(g_ptr + tok[:, None] * stride_gn + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(b.dtype)
        acc = mma(g, b, acc, PRECISION)
    cdt = h_ptr.dtype.element_ty
    ga = acc.to(cdt).to(tl.float32)  # the reference rounds this GEMM's output to the compute dtype
    if GATED:
        if INTERLEAVED:
            col_g = 2 * rn
            col_u = 2 * rn + 1
        else:
            col_g = rn
            col_u = rn + FFN
    else:
        col_g = rn
        col_u = rn
    omask = mmask[:, None] & nmask[None, :]
    hg = tl.load(h_ptr + rows[:, None] * stride_hs + col_g[None, :], mask=omask, other=0.0).to(tl.float32)
    act_g = act_fwd(hg, ACT).to(cdt).to(tl.float32)
    if GATED:
        hu = tl.load(h_ptr + rows[:, None] * stride_hs + col_u[None, :], mask=omask, other=0.0).to(tl.float32)
        a = (act_g * hu).to(cdt).to(tl.float32)
    else:
        a = act_g
    tl.store(a_ptr + rows[:, None] * stride_as + rn[None, :], a.to(a_ptr.dtype.element_ty), mask=omask)
    if NEED_GW:
        tl.atomic_add(gw_ptr + rm, tl.sum(ga * a, axis=1), mask=mmask, sem="relaxed")
    rw = tl.load(rw_ptr + slot, mask=mmask, other=0.0).to(tl.float32)
    gaw = (ga * rw[:, None]).to(cdt).to(tl.float32)
    if GATED:
        tl.store(gh_ptr + rows[:, None] * stride_hs + col_u[None, :], (gaw * act_g).to(cdt), mask=omask)
        gg = act_bwd((gaw * hu).to(cdt).to(tl.float32), hg, ACT)
        tl.store(gh_ptr + rows[:, None] * stride_hs + col_g[None, :], gg.to(cdt), mask=omask)
    else:
        tl.store(gh_ptr + rows[:, None] * stride_hs + col_g[None, :], act_bwd(gaw, hg, ACT).to(cdt), mask=omask)


@triton.jit
def _grouped_dw_kernel(
    a_ptr, perm_ptr, rw_ptr, b_ptr, offsets_ptr, out_ptr,
    E, TOPK, HID, FFN, M, N,
    stride_ar, stride_bs, stride_oe, stride_om, stride_on,
    A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[e, m, n] = sum over rows r of expert e: A[row(r), m] * scale(r) * B[r, n]
    e = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pm = tl.program_id(1) // num_n
    pn = tl.program_id(1) % num_n
    end = tl.load(offsets_ptr + e).to(tl.int32)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        rmask = rr < end
        b = tl.load(b_ptr + rr.to(tl.int64)[:, None] * stride_bs + rn[None, :], mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
        if A_GATHER:
            slot = tl.load(perm_ptr + rr, mask=rmask, other=0)
            arow = (slot // TOPK).to(tl.int64)
        else:
            arow = rr.to(tl.int64)
        at = tl.load(a_ptr + arow[None, :] * stride_ar + rm[:, None], mask=mmask[:, None] & rmask[None, :], other=0.0)
        if A_SCALE:
            scale = tl.load(rw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
            at = at.to(tl.float32) * scale[None, :]
        acc = mma(at.to(b.dtype), b, acc, PRECISION)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


_down_backward_tuned = triton.autotune(configs=triton_configs(GEMM_CONFIGS), key=_KEY,
                                       reset_to_zero=["gw_ptr"])(_down_backward_kernel)
_grouped_dw_tuned = triton.autotune(configs=triton_configs(DW_CONFIGS), key=_KEY + ["M", "N"])(_grouped_dw_kernel)


def _identity(kernel):
    return kernel


def down_backward(grad_out_NH: torch.Tensor, perm_S: torch.Tensor, offsets_E: torch.Tensor, w_down: torch.Tensor,
                  h_SO: torch.Tensor, weights_S: torch.Tensor, *, top_k: int, activation: str, gated: bool,
                  interleaved: bool, down_transposed: bool, need_gw: bool, allow_tf32: bool = False,
                  wrap: Callable = _identity) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather of the output gradient + ``g W_down`` + activation backward.

    Returns:
        ``gh [S, O]`` (gradient of the first GEMM's output, compute dtype), ``a [S, F]``
        (the recomputed activation, for dW_down) and ``gw_sorted [S] fp32`` (routing-weight
        gradient per row in expert order; zeros when ``need_gw`` is False).
    """
    from grouter_pass.kernels.grouped_gemm_kernels import linear_strides

    g = grad_out_NH if grad_out_NH.stride(-1) == 1 else grad_out_NH.contiguous()
    s, o = h_SO.shape
    e, hid = w_down.shape[0], g.shape[1]
    f = o // 2 if gated else o
    s_e, s_out, s_in = linear_strides(w_down, down_transposed)  # out = H, in = F
    gh = torch.empty_like(h_SO)
    a = torch.empty((s, f), dtype=h_SO.dtype, device=g.device)
    gw = torch.zeros(s, dtype=torch.float32, device=g.device)
    if s == 0:
        return gh, a, gw
    e_p2 = triton.next_power_of_2(max(e, 2))

    def grid(meta):
        return (num_m_tiles(s, e, meta["BLOCK_M"]), triton.cdiv(f, meta["BLOCK_N"]))

    launch(_down_backward_kernel, _down_backward_tuned, GEMM_CONFIGS, grid, wrap,
           g, perm_S, w_down, h_SO, weights_S, offsets_E, gh, a, gw,
           e, top_k, hid, f,
           g.stride(0), s_e, s_out, s_in, h_SO.stride(0), a.stride(0),
           ACT=ACTIVATIONS[activation], GATED=gated, INTERLEAVED=interleaved, NEED_GW=need_gw,
           PRECISION=dot_precision(h_SO.dtype, allow_tf32), E_P2=e_p2)
    return gh, a, gw


def grouped_weight_grad(a_src: torch.Tensor, b_SN: torch.Tensor, perm_S: torch.Tensor | None,
                        weights_S: torch.Tensor | None, offsets_E: torch.Tensor, out: torch.Tensor,
                        out_strides: tuple[int, int, int], *, top_k: int, allow_tf32: bool = False,
                        wrap: Callable = _identity) -> torch.Tensor:
    """``out[e] (M x N, through out_strides) = A[rows_e]^T B[rows_e]``, written into ``out``.

    ``a_src`` is ``[S, M]`` in expert order, or ``[N, M]`` token rows when ``perm_S`` is given
    (row of slot r = ``perm[r] // top_k``); ``weights_S`` (flat ``[N*K]``) scales A's rows.
    """
    a = a_src if a_src.stride(-1) == 1 else a_src.contiguous()
    b = b_SN if b_SN.stride(-1) == 1 else b_SN.contiguous()
    m, n = a.shape[1], b.shape[1]
    e = offsets_E.shape[0]
    if e == 0:
        return out

    def grid(meta):
        return (e, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))

    launch(_grouped_dw_kernel, _grouped_dw_tuned, DW_CONFIGS, grid, wrap,
           a, perm_S if perm_S is not None else offsets_E, weights_S if weights_S is not None else a, b, offsets_E,
           out, e, top_k, m, n, m, n,
           a.stride(0), b.stride(0), out_strides[0], out_strides[1], out_strides[2],
           A_GATHER=perm_S is not None, A_SCALE=weights_S is not None,
           PRECISION=dot_precision(b.dtype, allow_tf32))
    return out
