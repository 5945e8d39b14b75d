"""The contract between the graph passes and the numerics.

Detection (``grouter_pass.passes.detect``) turns a matched subgraph into these frozen
dataclasses; the rewrite turns them into ``torch.ops.grouter.*`` calls; the ops read them back
(as plain scalar arguments, so the schema stays simple and the FX graph stays printable).
Nothing here imports torch.fx or the passes: a reader can understand what a gating site *is*
without knowing how it was found.

Legend for shapes used in docstrings across the package:
    N tokens, K top-k, S = N*K routed slots, E experts, H hidden, F expert FFN width,
    G expert groups (group-limited top-k).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

ScoreFunc = Literal["softmax", "sigmoid", "none", "sparsemixer"]
#: families whose gating the rewrite keeps as the model wrote it (no ``grouter.route``)
KEPT_FAMILIES = ("hash", "kept")
Order = Literal["score_then_topk", "topk_then_score"]
BiasMode = Literal["none", "selection", "score"]
GroupScore = Literal["top2_sum", "max"]
Renorm = Literal["none", "sum", "lp"]


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def compact_repr(obj: Any) -> str:
    """``Name(field=value, ...)`` listing only the fields that differ from their defaults: stable
    when a new field with a default is added, short enough to read in a snapshot."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or value != default:
            if dataclasses.is_dataclass(value):
                text = compact_repr(value)
            elif isinstance(value, torch.dtype):
                text = _dtype_name(value)
            else:
                text = repr(value)
            parts.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


#: the :class:`GatingSpec` fields ``grouter::route`` takes after ``(logits, bias)``, in its schema
#: order; the op's signature is generated from them (``ops/route.py``)
ROUTE_ARGS = ("top_k", "score_func", "order", "bias_mode", "n_group", "topk_group", "group_score", "renorm",
              "renorm_eps", "renorm_clamp_min", "renorm_p", "scaling_factor", "score_dtype", "weights_dtype",
              "sorted", "sparsemixer_threshold")


@dataclass(frozen=True)
class GatingSpec:
    """What a gating site computes, from router logits ``[N, E]`` to ``(weights, ids)`` ``[N, K]``.

    The semantics are defined by :func:`grouter_pass.ops.reference.route_reference`; in words:

    1. ``x = logits.to(score_dtype)`` (no cast when ``score_dtype`` is None).
    2. ``score_then_topk``: scores = score_func(x); the selection tensor is scores (+ bias when
       ``bias_mode != "none"``), optionally masked to the best ``topk_group`` of ``n_group``
       groups; ids = top-k of the selection tensor; weights are gathered from the scores
       (biased scores when ``bias_mode == "score"``, unbiased when ``"selection"``).
       ``topk_then_score``: ids and values = top-k of x (+ bias); weights = score_func(values).
    3. ``renorm``: weights / (sum or L-p norm of weights [+ eps], clamped below at
       ``renorm_clamp_min`` when set).
    4. weights * ``scaling_factor``, then cast to ``weights_dtype``.
    """

    family: str
    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    order: Order = "score_then_topk"
    score_dtype: torch.dtype | None = None
    bias_mode: BiasMode = "none"
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"
    renorm: Renorm = "none"
    renorm_eps: float = 0.0
    renorm_clamp_min: float | None = None
    renorm_p: float = 1.0
    scaling_factor: float = 1.0
    weights_dtype: torch.dtype = torch.float32
    sorted: bool = True
    #: PhiMoE's sparsemixer (``score_func="sparsemixer"``, top-2, evaluation mode): experts whose
    #: score is further than this relative distance from the best one are masked out of the softmax
    sparsemixer_threshold: float = 0.0
    #: ops the model applies between its router logits and the tensor ``route`` starts from
    #: (an unusual score function, a temperature, noise): they stay in the graph as written
    prelude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group

    @property
    def uses_route_op(self) -> bool:
        """False when the gating is kept as the model wrote it (hash routing, or a gating no spec
        reproduces): only the experts are rewritten."""
        return self.family not in KEPT_FAMILIES

    def route_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torch.ops.grouter.route`` for this spec (:data:`ROUTE_ARGS`)."""
        return {name: getattr(self, name) for name in ROUTE_ARGS}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["score_dtype"] = _dtype_name(self.score_dtype)
        d["weights_dtype"] = _dtype_name(self.weights_dtype)
        d["prelude"] = list(self.prelude)
        return d

    def describe(self) -> str:
        """One short human line: ``softmax -> top-2, renorm sum``."""
        if self.family == "hash":
            return f"top-{self.top_k} from a token-id table, weights as written"
        if self.family == "kept":
            return f"top-{self.top_k}, gating kept as written"
        text = self._describe_rule()
        if self.prelude:
            text = f"[{' -> '.join(self.prelude)}] -> {text}"
        return text

    def _describe_rule(self) -> str:
        if self.score_func == "sparsemixer":
            return f"sparsemixer top-{self.top_k} (threshold {self.sparsemixer_threshold:g})"
        if self.order == "score_then_topk":
            parts = [self.score_func]
            if self.bias_mode != "none":
                parts.append(f"+bias({self.bias_mode})")
            if self.group_limited:
                parts.append(f"group-top-{self.topk_group}/{self.n_group}({self.group_score})")
            parts.append(f"top-{self.top_k}")
        else:
            parts = [f"top-{self.top_k}", f"{self.score_func} over k"]
        text = " -> ".join(parts)
        if self.renorm != "none":
            extra = f"L{self.renorm_p:g}" if self.renorm == "lp" else "sum"
            if self.renorm_eps:
                extra += f"+{self.renorm_eps:g}"
            if self.renorm_clamp_min is not None:
                extra += f" clamp>={self.renorm_clamp_min:g}"
            text += f", renorm {extra}"
        if self.scaling_factor != 1.0:
            text += f", x{self.scaling_factor:g}"
        return text


Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu"]


@dataclass(frozen=True)
class ActivationSpec:
    """The elementwise function between the two expert GEMMs, ``[S, 2F] -> [S, F]`` (gated) or
    ``[S, F] -> [S, F]`` (plain).

    ``gated``: ``act(gate) * up`` with gate/up taken as the two halves (``layout="concat"``) or
    the even/odd columns (``"interleaved"``). ``clamped_swiglu`` is GPT-OSS's variant:
    ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """

    kind: Activation = "silu"
    gated: bool = True
    layout: Literal["concat", "interleaved"] = "concat"
    alpha: float = 1.0
    limit: float = 0.0

    def op_kwargs(self) -> dict[str, Any]:
        return dict(activation=self.kind, gated=self.gated, interleaved=self.layout == "interleaved",
                    alpha=self.alpha, limit=self.limit)

    def describe(self) -> str:
        if self.kind == "clamped_swiglu":
            return f"clamped_swiglu(alpha={self.alpha:g}, limit={self.limit:g}, {self.layout})"
        return f"{self.kind}-glu({self.layout})" if self.gated else self.kind


@dataclass(frozen=True)
class ExpertMLP:
    """What every routed expert computes and how its weights lie: the scalar arguments of each
    experts op (``grouter::moe_experts``, its backward, their Triton twins, the expert-parallel
    entry), in schema order.

    Why one dataclass: these values travel together from detection (:class:`ExpertsSpec`)
    through the graph into every implementation (reference, CPU queue, Triton, expert
    parallel). An op schema holds only plain values, so the graph carries them as flat
    arguments; the op signatures are generated from these fields (``ops/experts_schema.py``),
    the ops rebuild the dataclass from their flat arguments (:meth:`from_args`) and the
    implementations take it whole. Adding a field touches this class and the implementations that read it, nothing else.

    ``activation`` ... ``limit`` are :class:`ActivationSpec`'s; ``up_transposed`` /
    ``down_transposed`` the weight layouts of :class:`ExpertsSpec`; ``weight_on_input`` scales
    each slot's input by its routing weight instead of its output (Llama 4).
    """

    activation: str = "silu"
    gated: bool = True
    interleaved: bool = False
    alpha: float = 1.0
    limit: float = 0.0
    up_transposed: bool = False
    down_transposed: bool = False
    weight_on_input: bool = False

    @classmethod
    def of(cls, activation: ActivationSpec, *, up_transposed: bool = False, down_transposed: bool = False,
           weight_on_input: bool = False) -> ExpertMLP:
        return cls(**activation.op_kwargs(), up_transposed=up_transposed, down_transposed=down_transposed,
                   weight_on_input=weight_on_input)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_args(cls, values: tuple[Any, ...] | list[Any]) -> ExpertMLP:
        """From an op's flat scalar arguments, in schema order (exactly ``len(names())`` of them)."""
        if len(values) != len(dataclasses.fields(cls)):
            raise TypeError(f"ExpertMLP takes {len(dataclasses.fields(cls))} values {cls.names()}, got "
                            f"{len(values)}: {tuple(values)}")
        return cls(*values)

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def activation_kwargs(self) -> dict[str, Any]:
        """The arguments of the activation functions (``activation_forward`` and friends)."""
        return dict(activation=self.activation, gated=self.gated, interleaved=self.interleaved, alpha=self.alpha,
                    limit=self.limit)


@dataclass(frozen=True)
class ExpertsSpec:
    """How the routed experts consume ``(x [N, H], weights [N, K], ids [N, K])``.

    ``style`` names the implementation found in the graph (``grouped_mm``, ``batched_mm``, ...).
    Weight layouts: ``up_transposed=False`` means ``w_up`` is ``[E, 2F, H]`` (out x in, as
    ``nn.Linear``); True means ``[E, H, 2F]``. Likewise ``down`` with ``[E, H, F]`` vs ``[E, F, H]``.
    The combine is ``sum_k(y * w)`` in ``promote(compute_dtype, weights dtype)``, cast to
    ``out_dtype``.
    """

    style: str
    num_experts: int
    top_k: int
    hidden_size: int
    ffn_size: int
    activation: ActivationSpec
    up_transposed: bool = False
    down_transposed: bool = False
    has_bias: bool = False
    #: the routing weight scales each slot's input (``expert(w * x)``, Llama 4) instead of its output
    weight_on_input: bool = False
    compute_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.float32
    #: capacity-based dispatch: at most this many slots per expert, the rest dropped (their
    #: routing weight counts as zero), kept in ``capacity_priority`` order: "token" (token order,
    #: a token's choices in turn), "choice" (every first choice before any second choice,
    #: GShard) or "score" (highest routing weight first)
    capacity: int | None = None
    capacity_priority: Literal["token", "choice", "score"] = "token"
    #: the router's E when it is larger than the FFN experts' (zero-computation experts): ids at
    #: or above ``num_experts`` return the token times its weight ("identity") or nothing ("zero")
    routed_experts: int | None = None
    extra_experts: Literal["none", "identity", "zero"] = "none"

    @property
    def mlp(self) -> ExpertMLP:
        return ExpertMLP.of(self.activation, up_transposed=self.up_transposed, down_transposed=self.down_transposed,
                            weight_on_input=self.weight_on_input)

    def op_kwargs(self) -> dict[str, Any]:
        """The experts op's scalar arguments by name: the :class:`ExpertMLP` fields and ``out_dtype``
        (the layout first, as graphs have always printed them)."""
        layout = dict(up_transposed=self.up_transposed, down_transposed=self.down_transposed,
                      weight_on_input=self.weight_on_input, out_dtype=self.out_dtype)
        return {**layout, **self.mlp.kwargs()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_dtype"] = _dtype_name(self.compute_dtype)
        d["out_dtype"] = _dtype_name(self.out_dtype)
        return d

    @property
    def has_extra_experts(self) -> bool:
        return self.extra_experts != "none" and (self.routed_experts or 0) > self.num_experts

    def describe(self) -> str:
        extra = (", bias" if self.has_bias else "") + (", weight on input" if self.weight_on_input else "")
        if self.capacity is not None:
            extra += f", capacity {self.capacity} ({self.capacity_priority} priority)"
        if self.has_extra_experts:
            extra += f", {self.routed_experts - self.num_experts} {self.extra_experts} experts"
        return (f"{self.style} E={self.num_experts} H={self.hidden_size} F={self.ffn_size} "
                f"{self.activation.describe()}{extra}")


@dataclass(frozen=True)
class NoMatch:
    """Why a candidate was not rewritten. ``detail`` is formatted lazily (matching runs on many
    nodes; most reasons are never printed)."""

    reason: str
    args: tuple[Any, ...] = ()
    #: True when the candidate looked like a MoE gating site (an E-way router feeding a top-k):
    #: such rejections are logged at INFO, plain non-sites only at DEBUG.
    partial: bool = False
    #: the detection step that failed ("router", "routing", "gating", "combine", "experts",
    #: "capacity", "probe", ...) and the graph node it failed on (its name)
    step: str = ""
    node: Any = ""

    def __post_init__(self) -> None:
        if not isinstance(self.node, str):  # a graph node: keep its name only (this module knows no fx)
            object.__setattr__(self, "node", getattr(self.node, "name", str(self.node)))

    @property
    def detail(self) -> str:
        return self.reason % self.args if self.args else self.reason

    @property
    def where(self) -> str:
        """``step at node``, for log lines."""
        if self.step and self.node:
            return f"{self.step} at node {self.node}"
        return self.step or (f"node {self.node}" if self.node else "")

    def __str__(self) -> str:
        return self.detail


@dataclass
class SiteReport:
    """What the pass did at one candidate site; collected into :class:`PassReport`."""

    module_path: str
    gating: GatingSpec | None = None
    experts: ExpertsSpec | None = None
    rewritten: bool = False
    reason: str | None = None
    #: for a site not rewritten: True when it looked like a MoE gating site (see NoMatch.partial)
    partial: bool = False
    new_ops: list[str] = field(default_factory=list)
    #: names (in the graph the pass received) of the nodes the rewrite removed, and of the nodes it
    #: added with their roles ("router", "dispatch_plan", "experts", "combine")
    removed_nodes: list[str] = field(default_factory=list)
    added_nodes: dict[str, str] = field(default_factory=dict)
    #: where the rewritten site's routing comes from: "learned" (exact), "grouter", "precomputed", "hash"
    routing: str = "learned"
    #: for a site not rewritten: the detection step that failed and the node it failed on
    step: str = ""
    node: str = ""

    @property
    def family(self) -> str:
        return self.gating.family if self.gating is not None else "?"

    def to_dict(self) -> dict[str, Any]:
        return {
            "module_path": self.module_path, "family": self.family if self.gating is not None else None,
            "rewritten": self.rewritten, "reason": self.reason, "partial": self.partial,
            "gating": self.gating.to_dict() if self.gating is not None else None,
            "experts": self.experts.to_dict() if self.experts is not None else None,
            "new_ops": list(self.new_ops), "removed_nodes": list(self.removed_nodes),
            "added_nodes": dict(self.added_nodes), "routing": self.routing, "step": self.step, "node": self.node,
        }

    def summary(self) -> str:
        where = f" [{self.step} at node {self.node}]" if self.step and self.node else (
            f" [{self.step}]" if self.step else "")
        if self.gating is None:
            return f"{self.module_path}: not rewritten{where}: {self.reason}"
        head = (f"{self.module_path}: {self.family} E={self.gating.num_experts} k={self.gating.top_k} "
                f"[{self.gating.describe()}]")
        if self.experts is not None:
            head += f" experts={self.experts.style} act={self.experts.activation.describe()}"
        if self.rewritten:
            return head + (" -> rewritten" if self.routing == "learned" else f" -> rewritten, {self.routing} routing")
        return head + f" -> left unchanged{where}: {self.reason}"


@dataclass
class PassReport:
    """The result of one run of the pass pipeline over one FX graph."""

    sites: list[SiteReport] = field(default_factory=list)
    #: Grouter modes: the one routing of the graph (``routing``, the shared ``nodes`` and their
    #: roles, router nodes ``removed``, ``aux_losses`` replaced by zero, router outputs ``kept``)
    shared: dict[str, Any] | None = None
    #: graph inputs (and the parameters behind them) no longer read after the rewrite
    unused_inputs: list[str] = field(default_factory=list)
    unused_parameters: list[Any] = field(default_factory=list, repr=False)
    #: ``GrouterConfig(expert_parallel=...)``: EP size, this rank, its experts, how splits are known
    expert_parallel: dict[str, Any] | None = None
    #: Grouter modes under EP: what the step runner needs (a ``passes.expert_parallel.EPStep``:
    #: routing source, E, k, layout, token input)
    ep_step: Any = field(default=None, repr=False)
    #: grouter op nodes pointed at their Triton twins (``{node: "grouter.moe_experts_triton"}``)
    kernels: dict[str, str] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def changed(self) -> bool:
        return bool(self.rewritten) or bool(self.kernels)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sites": [s.to_dict() for s in self.sites]}
        if self.shared is not None:
            d["shared"] = dict(self.shared)
            d["unused_inputs"] = list(self.unused_inputs)
        if self.expert_parallel is not None:
            d["expert_parallel"] = dict(self.expert_parallel)
        if self.kernels:
            d["kernels"] = dict(self.kernels)
        return d
