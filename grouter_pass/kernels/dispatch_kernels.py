"""Dispatch plan on the GPU in three small launches, with no host synchronisation.

Legend: S = N*K routed slots, E experts, NB = cdiv(S, BLOCK_S) slot blocks.

1. ``_plan_count_kernel``: each program histograms its block of expert ids -> ``block_counts [NB, E]``.
2. ``_plan_scan_kernel`` (one program): per-expert totals, their inclusive scan (``offsets``),
   the same scan of tile-padded counts (``padded_offsets``), and the exclusive scan of the block
   counts in expert-major order -> ``block_base [NB, E]``, the first output position of each
   (block, expert).
3. ``_plan_scatter_kernel``: each slot's stable rank among the slots of its expert inside its
   block; ``perm[base + rank] = slot`` and ``inv_perm[slot] = base + rank``.

The result equals a stable counting sort (``torch.sort(ids, stable=True)``), so it matches
:func:`grouter_pass.ops.reference.dispatch_plan_reference` bit for bit. Every buffer size is a
function of ``(S, E)``: nothing is read back to the host.

Troubleshooting: ids outside ``[0, E)`` are not checked here (that would need a host read);
their slots are left out of ``perm``. The reference path raises on them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

BLOCK_S = 128  # slots per program of the count and scatter kernels
SCAN_BLOCK = 64  # slot blocks per iteration of the scan


def _identity(kernel):
    return kernel


@triton.jit
def _plan_count_kernel(ids_ptr, block_counts_ptr, S, E, E_P2: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + rs, mask=rs < S, other=E_P2).to(tl.int32)
    valid = (rs < S) & (ids >= 0) & (ids < E)
    hist = tl.histogram(tl.where(valid, ids, 0), E_P2, mask=valid)
    re = tl.arange(0, E_P2)
    tl.store(block_counts_ptr + pid * E + re, hist, mask=re < E)


@triton.jit
def _plan_scan_kernel(block_counts_ptr, block_base_ptr, counts_ptr, offsets_ptr, padded_offsets_ptr, NB, E,
                      PAD: tl.constexpr, E_P2: tl.constexpr, BLOCK_B: tl.constexpr):
    re = tl.arange(0, E_P2)
    emask = re < E
    totals = tl.zeros((E_P2,), dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        m = (rb[:, None] < NB) & emask[None, :]
        c = tl.load(block_counts_ptr + rb[:, None] * E + re[None, :], mask=m, other=0)
        totals += tl.sum(c, axis=0)
    ends = tl.cumsum(totals, axis=0)
    tl.store(counts_ptr + re, totals.to(tl.int64), mask=emask)
    tl.store(offsets_ptr + re, ends, mask=emask)
    padded = (totals + PAD - 1) // PAD * PAD
    tl.store(padded_offsets_ptr + re, tl.cumsum(padded, axis=0), mask=emask)
    carry = ends - totals  # first position of each expert
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        m = (rb[:, None] < NB) & emask[None, :]
        c = tl.load(block_counts_ptr + rb[:, None] * E + re[None, :], mask=m, other=0)
        incl = tl.cumsum(c, axis=0)
        tl.store(block_base_ptr + rb[:, None] * E + re[None, :], carry[None, :] + incl - c, mask=m)
        carry += tl.sum(c, axis=0)


@triton.jit
def _plan_scatter_kernel(ids_ptr, block_base_ptr, perm_ptr, inv_perm_ptr, S, E, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    rs = pid * BLOCK + local
    ids = tl.load(ids_ptr + rs, mask=rs < S, other=-1).to(tl.int32)
    valid = (rs < S) & (ids >= 0) & (ids < E)
    # stable rank: earlier slots of the block with the same expert
    same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(block_base_ptr + pid * E + ids, mask=valid, other=0)
    pos = (base + rank).to(tl.int64)
    tl.store(perm_ptr + pos, rs.to(tl.int64), mask=valid)
    tl.store(inv_perm_ptr + rs, pos, mask=valid)


def dispatch_plan_triton(ids_NK: torch.Tensor, num_experts: int, *, pad_to: int = 128,
                         wrap: Callable = _identity
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of routed slots by expert.

    Args:
        ids_NK: expert ids ``[N, K]`` (any integer dtype).
        num_experts: E.
        pad_to: tile size for ``padded_offsets``.
        wrap: applied to each kernel before launch (``torch.library.wrap_triton`` inside a
            ``triton_op``, so that Inductor sees the kernels).

    Returns:
        ``perm [S] int64, inv_perm [S] int64, counts [E] int64, offsets [E] int32`` (the
        :func:`~grouter_pass.ops.reference.dispatch_plan_reference` outputs) and
        ``padded_offsets [E] int32``, the end offsets with every expert's rows rounded up to
        ``pad_to`` (for consumers that want tile-aligned groups).
    """
    ids = ids_NK.reshape(-1).contiguous()
    s, e = ids.numel(), num_experts
    dev = ids.device
    nb = triton.cdiv(s, BLOCK_S)
    e_p2 = triton.next_power_of_2(max(e, 2))
    block_counts = torch.empty((max(nb, 1), e), dtype=torch.int32, device=dev)
    block_base = torch.empty_like(block_counts)
    perm = torch.empty(s, dtype=torch.int64, device=dev)
    inv_perm = torch.empty(s, dtype=torch.int64, device=dev)
    counts = torch.empty(e, dtype=torch.int64, device=dev)
    offsets = torch.empty(e, dtype=torch.int32, device=dev)
    padded_offsets = torch.empty(e, dtype=torch.int32, device=dev)
    if nb:
        wrap(_plan_count_kernel)[(nb,)](ids, block_counts, s, e, E_P2=e_p2, BLOCK=BLOCK_S)
    wrap(_plan_scan_kernel)[(1,)](block_counts, block_base, counts, offsets, padded_offsets, nb, e, PAD=pad_to,
                                  E_P2=e_p2, BLOCK_B=SCAN_BLOCK)
    if nb:
        wrap(_plan_scatter_kernel)[(nb,)](ids, block_base, perm, inv_perm, s, e, BLOCK=BLOCK_S)
    return perm, inv_perm, counts, offsets, padded_offsets
