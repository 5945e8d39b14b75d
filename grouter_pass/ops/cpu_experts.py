"""CPU implementation of ``grouter::moe_experts`` and its backward: experts in parallel, one
fused pass per expert.

Why not the reference's shape (one ATen call per step over all ``S = N*K`` rows, each GEMM a
2-thread ``torch.mm`` per expert): every ``torch.mm`` opens an OpenMP parallel region, and on a
shared or oversubscribed machine the barrier at the end of each of the ~400 regions per step
waits for a descheduled thread; measured on the 2-core benchmark machine under load, 64
per-expert GEMMs took 5-7x longer with 2 threads than with 1 (docs/performance.md). Here the
experts are split between ``torch.get_num_threads()`` Python threads (ATen releases the GIL),
each running its experts single-threaded from gather to weighted output while the rows are in
cache: ``x[tokens] -> h = x W_up^T -> act -> y = a W_down^T -> y *= w``. The threads meet once
per call (plus once for the combine), no ``[S, H]`` gathered copy of ``x`` exists, and the
per-element arithmetic is the reference's, so results equal the reference's up to the GEMM
library's blocking.

Only the common configuration is handled (see :func:`supported`): one dtype for activations
and weights, weight on the output. Everything else runs :mod:`grouter_pass.ops.reference`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from grouter_pass.ops import reference as R
from grouter_pass.spec import ExpertMLP

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
# threads of the expert/token queue while a whole call runs with ATen single-threaded
_call_state = threading.local()


def _queue_threads() -> int:
    return getattr(_call_state, "threads", 0) or torch.get_num_threads()


@contextlib.contextmanager
def _threads_for_queue(threads: int) -> Iterator[None]:
    before = getattr(_call_state, "threads", 0)
    _call_state.threads = threads
    try:
        yield
    finally:
        _call_state.threads = before


def supported(x: torch.Tensor, weights: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              weight_on_input: bool) -> bool:
    """Whether this path reproduces the reference for these inputs."""
    cdt = w_up.dtype
    return (x.device.type == "cpu" and not weight_on_input and x.dim() == 2 and x.dtype == cdt
            and w_down.dtype == cdt and torch.promote_types(cdt, weights.dtype) == cdt)


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != workers:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grouter-experts")
        _pool_size = workers
    return _pool


def _largest_first(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return sorted(segments, key=lambda seg: seg[1] - seg[2])


@contextlib.contextmanager
def single_threaded_aten() -> Iterator[None]:
    """ATen single-threaded on this thread for the block (restored after)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _run_parallel(work: Callable[[T], None], items: Sequence[T]) -> None:
    """``work(item)`` for every item, pulled from a shared queue by this thread and
    ``torch.get_num_threads() - 1`` pool threads (a descheduled thread delays only its current
    item, not a fixed share); every thread runs ATen single-threaded, without autograd recording."""
    threads = max(_queue_threads(), 1)
    queue = iter(items)
    lock = threading.Lock()
    # thread-local modes of the calling thread that change what the ops do (inference tensors
    # may only be written in inference mode; autocast picks the GEMMs' dtype)
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def drain() -> None:
        # inference_mode(False) would turn grad mode back on, so it is entered only when set
        mode = torch.inference_mode() if inference else contextlib.nullcontext()
        with mode, torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            torch.set_num_threads(1)  # ATen's thread count is per thread (OpenMP ICV, MKL local)
            while True:
                with lock:
                    item = next(queue, _DONE)
                if item is _DONE:
                    return
                work(item)

    with single_threaded_aten():
        helpers = min(threads, len(items)) - 1
        futures = [_executor(threads - 1).submit(drain) for _ in range(helpers)]
        try:
            drain()
        finally:
            for f in futures:
                f.result()


def _whole_call_single_threaded(fn: Callable) -> Callable:
    """Run a whole op call with ATen single-threaded on this thread: the small steps around the
    expert loop (sorting the plan's positions, index arithmetic on ``[S]``) then never open
    OpenMP regions of their own; the parallelism is the expert/token queue."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        with single_threaded_aten():
            with _threads_for_queue(threads):
                return fn(*args, **kwargs)

    return wrapper


def _token_chunks(n: int, threads: int) -> list[tuple[int, int]]:
    step = max(64, -(-n // (4 * max(threads, 1))))
    return [(t0, min(t0 + step, n)) for t0 in range(0, n, step)]


def _combine(rows_S: torch.Tensor, inv_perm_S: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``out[t] = sum of rows_S[slot]`` over token t's K slots, added in expert order starting
    from zero: the same additions in the same order as the reference's ``index_add_`` (so the
    same bits), but token-parallel and without the ``[S, H]`` index ATen expands it into."""
    out = rows_S.new_empty(n, rows_S.shape[1])
    if n == 0:
        return out
    pos_NK = inv_perm_S.view(n, k).sort(dim=1).values

    def work(chunk: tuple[int, int]) -> None:
        t0, t1 = chunk
        gathered = rows_S.index_select(0, pos_NK[t0:t1].reshape(-1)).view(t1 - t0, k, -1)
        acc = out[t0:t1]
        torch.add(gathered[:, 0], 0.0, out=acc)  # 0 + y: also turns -0.0 into 0.0, as index_add_ on zeros
        for j in range(1, k):
            acc += gathered[:, j]

    _run_parallel(work, _token_chunks(n, _queue_threads()))
    return out


def _mm_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(a, b, out=out)


@_whole_call_single_threaded
def moe_experts_cpu(x_NH: torch.Tensor, weights_NK: torch.Tensor, perm_S: torch.Tensor, inv_perm_S: torch.Tensor,
                    offsets_E: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None,
                    b_down: torch.Tensor | None, *, mlp: ExpertMLP, out_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, same contract as :func:`~grouter_pass.ops.reference.moe_experts_reference`."""
    n, hidden = x_NH.shape
    k = weights_NK.shape[1]
    s = perm_S.numel()
    act_kw = mlp.activation_kwargs()
    up_transposed, down_transposed = mlp.up_transposed, mlp.down_transposed
    segs = R._segments(offsets_E)
    tok_S = torch.div(perm_S, k, rounding_mode="floor")
    w_sorted_S1 = weights_NK.reshape(-1).index_select(0, perm_S).unsqueeze(-1)
    up_out = w_up.shape[2] if up_transposed else w_up.shape[1]
    h = x_NH.new_empty(s, up_out, dtype=w_up.dtype)
    y = x_NH.new_empty(s, hidden, dtype=w_up.dtype)

    def work(seg: tuple[int, int, int]) -> None:
        e, s0, s1 = seg
        x_e = x_NH.index_select(0, tok_S[s0:s1])
        h_e = h[s0:s1]
        _mm_out(x_e, w_up[e] if up_transposed else w_up[e].t(), h_e)
        if b_up is not None:
            h_e += b_up[e]
        a_e = R.activation_forward(h_e, **act_kw)
        y_e = y[s0:s1]
        _mm_out(a_e, w_down[e] if down_transposed else w_down[e].t(), y_e)
        if b_down is not None:
            y_e += b_down[e]
        y_e.mul_(w_sorted_S1[s0:s1])

    _run_parallel(work, _largest_first(segs))
    covered = segs[-1][2] if segs else 0
    if covered < s:  # rows beyond offsets[-1] belong to no expert (as in the reference)
        h[covered:].zero_()
        y[covered:].zero_()
    out = _combine(y, inv_perm_S, n, k)
    return out.to(x_NH.dtype if out_dtype is None else out_dtype), h


@_whole_call_single_threaded
def moe_experts_backward_cpu(
    grad_out_NH: torch.Tensor, x_NH: torch.Tensor, weights_NK: torch.Tensor, perm_S: torch.Tensor,
    inv_perm_S: torch.Tensor, offsets_E: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    b_up: torch.Tensor | None, b_down: torch.Tensor | None, h: torch.Tensor, *, mlp: ExpertMLP,
    needs_input_grad: Sequence[bool] = (True,) * 6,
) -> tuple[torch.Tensor | None, ...]:
    """Backward, same contract as :func:`~grouter_pass.ops.reference.moe_experts_backward_reference`."""
    n, hidden = x_NH.shape
    k = weights_NK.shape[1]
    s = perm_S.numel()
    need_x, need_w, need_up, need_down, need_bup, need_bdown = needs_input_grad
    need_bup = need_bup and b_up is not None
    need_bdown = need_bdown and b_down is not None
    act_kw = mlp.activation_kwargs()
    up_transposed, down_transposed = mlp.up_transposed, mlp.down_transposed
    segs = R._segments(offsets_E)
    tok_S = torch.div(perm_S, k, rounding_mode="floor")
    w_sorted_S1 = weights_NK.reshape(-1).index_select(0, perm_S).unsqueeze(-1)
    g_src = grad_out_NH.to(w_up.dtype)
    covered = segs[-1][2] if segs else 0
    gw_sorted = x_NH.new_empty(s, dtype=w_up.dtype) if need_w else None
    gx_sorted = x_NH.new_empty(s, hidden, dtype=w_up.dtype) if need_x else None
    for buf in (gw_sorted, gx_sorted):  # the workers write every row of an expert; zero the rest
        if buf is not None and covered < s:
            buf[covered:].zero_()
    hit = {e for e, _, _ in segs}

    def grad_buffer(need: bool, like: torch.Tensor | None) -> torch.Tensor | None:
        if not need or like is None:
            return None
        out = torch.empty_like(like)
        for e in range(like.shape[0]):
            if e not in hit:
                out[e].zero_()
        return out

    g_wu, g_wd = grad_buffer(need_up, w_up), grad_buffer(need_down, w_down)
    g_bu, g_bd = grad_buffer(need_bup, b_up), grad_buffer(need_bdown, b_down)

    def work(seg: tuple[int, int, int]) -> None:
        e, s0, s1 = seg
        tok_e, w_e = tok_S[s0:s1], w_sorted_S1[s0:s1]
        g_e = g_src.index_select(0, tok_e)
        h_e = h[s0:s1]
        a, act_gate = R.activation_forward_saving(h_e, **act_kw)
        ga = g_e.new_empty(s1 - s0, a.shape[1])  # out= form, as the reference (autocast skips it)
        _mm_out(g_e, w_down[e].t() if down_transposed else w_down[e], ga)
        if need_w:
            gw = (ga * a).sum(dim=-1)
            if b_down is not None:
                gw += g_e @ b_down[e]
            gw_sorted[s0:s1] = gw
        ga.mul_(w_e)
        if need_down or need_bdown:
            gy = g_e.mul_(w_e)
            if need_down:
                if down_transposed:
                    _mm_out(a.t(), gy, g_wd[e])
                else:
                    _mm_out(gy.t(), a, g_wd[e])
            if need_bdown:
                torch.sum(gy, dim=0, out=g_bd[e])
        del a
        gh = R.activation_backward(ga, h_e, act_gate=act_gate, **act_kw)
        if need_up:
            x_e = x_NH.index_select(0, tok_e)
            if up_transposed:
                _mm_out(x_e.t(), gh, g_wu[e])
            else:
                _mm_out(gh.t(), x_e, g_wu[e])
        if need_bup:
            torch.sum(gh, dim=0, out=g_bu[e])
        if need_x:
            _mm_out(gh, w_up[e].t() if up_transposed else w_up[e], gx_sorted[s0:s1])

    _run_parallel(work, _largest_first(segs))
    grad_weights = grad_x = None
    if need_w:
        grad_weights = gw_sorted.index_select(0, inv_perm_S).view(n, k).to(weights_NK.dtype)
    if need_x:
        grad_x = _combine(gx_sorted, inv_perm_S, n, k).to(x_NH.dtype)
    return grad_x, grad_weights, g_wu, g_wd, g_bu, g_bd
