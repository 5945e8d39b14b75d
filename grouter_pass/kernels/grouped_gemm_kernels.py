"""Forward grouped GEMMs with fused gather, activation and weighted scatter-combine.

Legend: N tokens, K top-k, S = N*K slots (in expert order: row r is slot ``perm[r]``, token
``perm[r] // K``), E experts, H hidden, F expert FFN width, O = 2F (gated) or F.

``_up_act_kernel``   rows of ``x`` read through ``perm`` (the expert-ordered copy of the tokens
                     is never materialised) -> ``h = x W_up^T (+ b_up)`` stored ``[S, O]`` for the
                     backward -> epilogue ``a = act(gate) * up`` (or ``act(h)``) stored ``[S, F]``.
``_down_combine_kernel``  ``y = a W_down^T (+ b_down)`` -> epilogue: times the slot's routing
                     weight, atomically added into the token's row of an fp32 ``[N, H]``
                     buffer (the combine; no ``[S, H]`` tensor exists). Also the input gradient
                     of the backward (``gh W_up`` scattered to tokens, no weight).

Weights are addressed through strides: ``B[k, n]`` of expert e is ``w + e*sb_e + k*sb_k +
n*sb_n``, which covers both layouts (``[E, out, in]`` and transposed) and the transposed use
in the backward without copies. fp32 GEMMs use IEEE products unless tf32 was opted into.

Troubleshooting: the combine uses fp32 atomics, so the order in which the K terms of a token
are summed varies between runs (a few ulps; the CPU path is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from grouter_pass.kernels.autotune import GEMM_CONFIGS, autotune_enabled, default_config, triton_configs
from grouter_pass.kernels.triton_utils import act_fwd, expert_tile, mma, num_m_tiles

_KEY = ["E", "TOPK", "HID", "FFN"]


@triton.jit
def _up_act_kernel(
    x_ptr, perm_ptr, w_ptr, b_ptr, offsets_ptr, h_ptr, a_ptr,
    E, TOPK, HID, FFN,
    stride_xn, stride_we, stride_wk, stride_wn, stride_be, stride_hs, stride_as,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, E_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, row0, row_end = expert_tile(offsets_ptr, E, tl.program_id(0), BLOCK_M, E_P2)
    if expert >= E:
        return
    rm = row0 + tl.arange(0, BLOCK_M)
    mmask = rm < row_end
    tok = (tl.load(perm_ptr + rm, mask=mmask, other=0) // TOPK).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < FFN
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
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < HID
        bmask = kmask[:, None] & nmask[None, :]
        b_g = tl.load(w_base + rk[:, None] * stride_wk + col_g[None, :] * stride_wn, mask=bmask, other=0.0)
        a = tl.load(x_ptr + tok[:, None] * stride_xn + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(b_g.dtype)
        acc_g = mma(a, b_g, acc_g, PRECISION)
        if GATED:
            b_u = tl.load(w_base + rk[:, None] * stride_wk + col_u[None, :] * stride_wn, mask=bmask, other=0.0)
            acc_u = mma(a, b_u, acc_u, PRECISION)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + expert * stride_be + col_g, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + expert * stride_be + col_u, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    out_ty = h_ptr.dtype.element_ty
    h_g = acc_g.to(out_ty)
    rows = rm.to(tl.int64)[:, None]
    tl.store(h_ptr + rows * stride_hs + col_g[None, :], h_g, mask=omask)
    # the activation reads h as stored (rounded to the compute dtype), like the reference
    act = act_fwd(h_g.to(tl.float32), ACT)
    if GATED:
        h_u = acc_u.to(out_ty)
        tl.store(h_ptr + rows * stride_hs + col_u[None, :], h_u, mask=omask)
        act = act.to(out_ty).to(tl.float32) * h_u.to(tl.float32)
    tl.store(a_ptr + rows * stride_as + rn[None, :], act.to(a_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _down_combine_kernel(
    a_ptr, perm_ptr, w_ptr, b_ptr, rw_ptr, offsets_ptr, out_ptr,
    E, TOPK, HID, FFN,
    stride_as, stride_we, stride_wk, stride_wn, stride_be, stride_on,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, PRECISION: tl.constexpr, E_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[token(r), n] += w(r) * sum_k a[r, k] B_e[k, n]; k over FFN columns, n over HID columns
    expert, row0, row_end = expert_tile(offsets_ptr, E, tl.program_id(0), BLOCK_M, E_P2)
    if expert >= E:
        return
    rm = row0 + tl.arange(0, BLOCK_M)
    mmask = rm < row_end
    rows = rm.to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < HID
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, FFN, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < FFN
        b = tl.load(w_base + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + rows[:, None] * stride_as + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(b.dtype)
        acc = mma(a, b, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    slot = tl.load(perm_ptr + rm, mask=mmask, other=0)
    if HAS_WEIGHT:
        acc = acc * tl.load(rw_ptr + slot, mask=mmask, other=0.0).to(tl.float32)[:, None]
    tok = (slot // TOPK).to(tl.int64)
    tl.atomic_add(out_ptr + tok[:, None] * stride_on + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :],
                  sem="relaxed")


_up_act_tuned = triton.autotune(configs=triton_configs(GEMM_CONFIGS), key=_KEY)(_up_act_kernel)
_down_combine_tuned = triton.autotune(configs=triton_configs(GEMM_CONFIGS), key=_KEY,
                                      reset_to_zero=["out_ptr"])(_down_combine_kernel)


def _identity(kernel):
    return kernel


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: IEEE fp32 products unless the user opted into tf32."""
    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def launch(kernel, tuned, table, grid: Callable[[dict], tuple], wrap: Callable, *args, **kwargs) -> None:
    """Launch ``tuned`` (autotuned) or ``kernel`` with the table's default config."""
    if autotune_enabled():
        wrap(tuned)[grid](*args, **kwargs)
        return
    bm, bn, bk, warps, stages = default_config(table)
    wrap(kernel)[grid](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def linear_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(expert, out, in)`` strides of a per-expert weight stored ``[E, out, in]`` or, when
    ``transposed``, ``[E, in, out]``."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transposed else (w.stride(0), w.stride(1), w.stride(2))


def up_act(x_NH: torch.Tensor, perm_S: torch.Tensor, offsets_E: torch.Tensor, w_up: torch.Tensor,
           b_up: torch.Tensor | None, *, top_k: int, activation: str, gated: bool, interleaved: bool,
           up_transposed: bool, allow_tf32: bool = False, wrap: Callable = _identity
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather + first grouped GEMM + activation.

    Args:
        x_NH: tokens ``[N, H]`` (row stride free, unit column stride).
        perm_S, offsets_E: the dispatch plan (int64 ``[S]``, int32 ``[E]`` end offsets).
        w_up: ``[E, O, H]`` (``[E, H, O]`` when ``up_transposed``); b_up ``[E, O]`` or None.

    Returns:
        ``h [S, O]`` (pre-activation, w_up's dtype) and ``a [S, F]`` (activation output).
    """
    from grouter_pass.kernels.triton_utils import ACTIVATIONS

    x = x_NH if x_NH.stride(-1) == 1 else x_NH.contiguous()
    s, hid = perm_S.numel(), x.shape[1]
    e = w_up.shape[0]
    s_e, s_out, s_in = linear_strides(w_up, up_transposed)
    o = w_up.shape[2] if up_transposed else w_up.shape[1]
    f = o // 2 if gated else o
    h = torch.empty((s, o), dtype=w_up.dtype, device=x.device)
    a = torch.empty((s, f), dtype=w_up.dtype, device=x.device)
    if s == 0:
        return h, a
    e_p2 = triton.next_power_of_2(max(e, 2))

    def grid(meta):
        return (num_m_tiles(s, e, meta["BLOCK_M"]), triton.cdiv(f, meta["BLOCK_N"]))

    launch(_up_act_kernel, _up_act_tuned, GEMM_CONFIGS, grid, wrap,
           x, perm_S, w_up, b_up if b_up is not None else w_up, offsets_E, h, a,
           e, top_k, hid, f,
           x.stride(0), s_e, s_in, s_out, b_up.stride(0) if b_up is not None else 0, h.stride(0), a.stride(0),
           ACT=ACTIVATIONS[activation], GATED=gated, INTERLEAVED=interleaved, HAS_BIAS=b_up is not None,
           PRECISION=dot_precision(w_up.dtype, allow_tf32), E_P2=e_p2)
    return h, a


def down_combine(a_SF: torch.Tensor, perm_S: torch.Tensor, offsets_E: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor | None, weights_S: torch.Tensor | None, num_tokens: int, *, top_k: int,
                 w_strides: tuple[int, int, int], hidden: int, allow_tf32: bool = False,
                 wrap: Callable = _identity) -> torch.Tensor:
    """Second grouped GEMM + routing weight + scatter-combine: ``out [N, hidden] fp32``.

    ``w_strides`` = ``(expert, k, n)`` strides of ``B[k, n]`` (k over ``a``'s columns, n over
    ``hidden``), so the same kernel serves ``a W_down^T`` and the backward's ``gh W_up``.
    ``weights_S`` is the flat ``[N*K]`` routing weights (indexed by slot), or None.
    """
    a = a_SF if a_SF.stride(-1) == 1 else a_SF.contiguous()
    s, ffn = a.shape
    e = w.shape[0]
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=a.device)
    if s == 0:
        return out
    e_p2 = triton.next_power_of_2(max(e, 2))

    def grid(meta):
        return (num_m_tiles(s, e, meta["BLOCK_M"]), triton.cdiv(hidden, meta["BLOCK_N"]))

    launch(_down_combine_kernel, _down_combine_tuned, GEMM_CONFIGS, grid, wrap,
           a, perm_S, w, b if b is not None else w, weights_S if weights_S is not None else a, offsets_E, out,
           e, top_k, hidden, ffn,
           a.stride(0), w_strides[0], w_strides[1], w_strides[2], b.stride(0) if b is not None else 0, out.stride(0),
           HAS_BIAS=b is not None, HAS_WEIGHT=weights_S is not None, PRECISION=dot_precision(w.dtype, allow_tf32),
           E_P2=e_p2)
    return out
