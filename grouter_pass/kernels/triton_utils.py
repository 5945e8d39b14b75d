"""Device functions shared by the grouped-GEMM kernels: tile scheduling and activations.

Tile scheduling without a host read: a grouped GEMM is launched on an upper bound of M tiles,
``cdiv(S, BLOCK_M) + E`` (every expert can waste at most one partial tile); each program finds
its expert by scanning the E per-expert tile counts, computed from ``offsets`` on the device,
and exits when it lies past the last tile.

Activations are written with the same formulas as ATen's CPU kernels (``x / (1 + exp(-x))``
for SiLU, ``sigmoid * (1 + x (1 - sigmoid))`` for its gradient), so fp32 results agree with the
reference to a few ulps.
"""

from __future__ import annotations

import triton
import triton.language as tl

from grouter_pass import env

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}



def _device_function(fn):
    """``triton.jit`` for a device helper, except under the interpreter, where a nested
    ``InterpretedFunction`` call re-patches ``triton.language`` on every call (half the run time
    of the interpreter tests); there the helper runs as the plain Python it already is. Decided
    at import, as ``triton.jit`` itself decides."""
    if env.triton_interpret():
        return fn
    return triton.jit(fn)


_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@_device_function
def expert_tile(offsets_ptr, E, pid_m, BLOCK_M: tl.constexpr, E_P2: tl.constexpr):
    """``(expert, first row, end row)`` of M tile ``pid_m``; ``expert >= E`` means no work."""
    re = tl.arange(0, E_P2)
    ends = tl.load(offsets_ptr + re, mask=re < E, other=0).to(tl.int32)
    starts = tl.load(offsets_ptr + re - 1, mask=(re > 0) & (re < E), other=0).to(tl.int32)
    counts = tl.where(re < E, ends - starts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, axis=0)
    expert = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
    pick = re == expert
    first_tile = tl.sum(tl.where(pick, cum - tiles, 0), axis=0)
    start = tl.sum(tl.where(pick, starts, 0), axis=0)
    end = tl.sum(tl.where(pick, ends, 0), axis=0)
    return expert, start + (pid_m - first_tile) * BLOCK_M, end


def _mma_interpreted(a, b, acc, PRECISION: tl.constexpr):
    # Triton 3.9's interpreter multiplies bf16 blocks as raw 16-bit integers (numpy has no
    # bf16); products of bf16 values are exact in fp32, so upcasting keeps the GPU semantics.
    if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def _mma(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION)


mma = _mma_interpreted if env.triton_interpret() else triton.jit(_mma)
mma.__doc__ = "``acc + a @ b`` with fp32 accumulation (``tl.dot``)."


@_device_function
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@_device_function
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@_device_function
def act_fwd(x, ACT: tl.constexpr):
    """Activation of fp32 ``x``: 0 silu, 1 gelu (erf), 2 gelu (tanh), 3 relu."""
    if ACT == 0:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    else:
        y = tl.where(x > 0, x, 0.0)
    return y


@_device_function
def act_bwd(grad, x, ACT: tl.constexpr):
    """``grad * act'(x)`` in fp32."""
    if ACT == 0:
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t = _tanh(inner)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        d = tl.where(x > 0, 1.0, 0.0)
    return grad * d


def num_m_tiles(slots: int, experts: int, block_m: int) -> int:
    """Upper bound of the M tiles of a grouped GEMM over ``slots`` rows split among ``experts``."""
    return triton.cdiv(slots, block_m) + experts
