"""The rewrite of one block and of a whole model (steps 1-5 in order), installing the proven
forward on the instance, reversibly."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from grouter_pass.integrations.empty_expert_grads import EmptyExpertGrads
from grouter_pass.integrations.loop_blocks.candidates import Candidate, find_loop_block_candidates
from grouter_pass.integrations.loop_blocks.forward import make_forward, output_roles
from grouter_pass.integrations.loop_blocks.gating import gating_spec, graph_breaks
from grouter_pass.integrations.loop_blocks.proof import params_without_grad, probe_inputs, run_block, same_results
from grouter_pass.integrations.loop_blocks.roles import Roles, expert_tensors, role_candidates
from grouter_pass.spec import ActivationSpec, GatingSpec, NoMatch

log = logging.getLogger(__name__)


@dataclass
class LoopBlockRewrite:
    """One block rewritten before Dynamo (or the reason it was not)."""

    path: str
    graph_breaks_before: int
    graph_breaks_after: int | None = None
    gating: GatingSpec | None = None
    activation: ActivationSpec | None = None
    reason: str | None = None
    _analysis: Any = field(default=None, repr=False)  # reused for identical blocks

    @property
    def rewritten(self) -> bool:
        return self.reason is None

    def summary(self) -> str:
        if not self.rewritten:
            return f"{self.path}: expert loop not rewritten: {self.reason}"
        return (f"{self.path}: expert loop rewritten before Dynamo [{self.gating.family}: {self.gating.describe()}; "
                f"{self.activation.describe()}]; graph breaks {self.graph_breaks_before} -> {self.graph_breaks_after}")


@dataclass
class Analysis:
    breaks_before: int
    breaks_after: int
    spec: tuple[GatingSpec, str | None]   # the spec and the path of the selection bias it reads
    roles: Roles
    ffn: int
    outputs: tuple


def rewrite_loop_block(cand: Candidate, *, tokens: int = 16, reuse: Analysis | None = None) -> LoopBlockRewrite:
    """Try to rewrite one candidate block in place (see the module docstring). ``reuse``: the
    analysis of an identical block, so only the proof runs for this one.

    The probes run the block on random inputs; what a forward writes into the block's buffers
    (per-expert token counts, say) is put back afterwards, and the global random generators are
    forked around them, so probing leaves no trace."""
    saved = {name: b.detach().clone() for name, b in cand.block.named_buffers()}
    device = cand.router_weight.device
    # a block with dropout or router jitter draws from the global generators when probed: fork
    # them, so the user's random stream is the same as without the pass
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with rng:
            return _rewrite_loop_block(cand, tokens=tokens, reuse=reuse, saved=saved)
    finally:
        with torch.no_grad():
            for name, b in cand.block.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _rewrite_loop_block(cand: Candidate, *, tokens: int, reuse: Analysis | None,
                        saved: dict[str, torch.Tensor]) -> LoopBlockRewrite:
    block = cand.block
    inputs = probe_inputs(cand, tokens)
    if reuse is None:
        try:
            breaks_before = graph_breaks(block, inputs[0])
        except Exception as e:  # noqa: BLE001 - the block does not even run on a [B, T, H] input
            return LoopBlockRewrite(cand.path, -1, reason=f"could not run the block on a [B, T, H] input ({e})")
    else:
        breaks_before = reuse.breaks_before
    report = LoopBlockRewrite(cand.path, breaks_before)
    if breaks_before == 0:
        report.reason = "no graph break: the graph pass handles it"
        return report
    spec = reuse.spec if reuse is not None else gating_spec(block, inputs[0], cand.router_weight)
    if isinstance(spec, NoMatch):
        report.reason = spec.detail
        return report
    report.gating = spec[0]   # from here on the block is an MoE block: a failure is worth reporting
    was_training = block.training
    try:
        refs = {mode: [run_block(block.train(mode), x, True) for x in inputs] for mode in (True, False)}
        updated = [name for name, b in block.named_buffers() if name in saved and not torch.equal(b, saved[name])]
        if updated:   # a forward written in the grouter ops would lose the update
            report.reason = (f"the block updates its buffers {updated} in its forward (statistics such as "
                             "tokens per expert); a rewritten forward would not, so it is left unchanged")
            return report
        if not same_results(refs[True][0], run_block(block.train(True), inputs[0], True)):
            report.reason = "the block's output is random in training mode (router jitter, dropout...)"
            return report
        block.train(was_training)
        if reuse is not None:
            outputs, candidates = reuse.outputs, [(reuse.roles, reuse.ffn)]
        else:
            with torch.no_grad():
                x0 = inputs[0].reshape(-1, cand.experts.hidden)
                logits = nn.functional.linear(x0, *cand.router.params(block))
                outputs = output_roles(block(inputs[0]), inputs[0], logits)
            if isinstance(outputs, NoMatch):
                report.reason = outputs.detail
                return report
            shapes = [tuple(get(block).shape[1:]) for _, get, _ in cand.experts.weights]
            candidates = role_candidates(cand.experts, shapes)
            if not candidates:
                report.reason = f"no reading of the expert weight shapes {shapes} as gate/up/down projections"
                return report
        original = block.forward
        matches = []
        for roles, ffn in candidates:
            if expert_tensors(block, cand.experts, roles, ffn) is None:
                continue
            block.forward = types.MethodType(make_forward(cand, spec, roles, ffn, *outputs), block)
            ok = all(same_results(ref, run_block(block.train(mode), x, True))
                     for mode in (True, False) for ref, x in zip(refs[mode], inputs))
            del block.forward
            if ok:
                matches.append((roles, ffn))
        block.train(was_training)
        if len(matches) != 1:
            report.reason = ("no assignment of gate/up/down weights and activation reproduces the block"
                             if not matches else f"{len(matches)} different expert readings reproduce the block")
            return report
        roles, ffn = matches[0]
        one_token = inputs[0][:1, :1]
        eager_none = params_without_grad(block.train(True), one_token)
        grads = EmptyExpertGrads(cand.experts.per_expert(block)) if eager_none and cand.experts.per_expert else None
        block.forward = types.MethodType(make_forward(cand, spec, roles, ffn, *outputs, grads=grads), block)
        ours_none = params_without_grad(block, one_token)
        block.train(was_training)
        if ours_none != eager_none:
            del block.forward
            if grads is not None:
                grads.remove()
            report.reason = (f"on one token eager leaves {sorted(eager_none)} without a gradient, the rewrite "
                             f"{sorted(ours_none)}; an optimizer would treat them differently")
            return report
        block._grouter_original_forward = original
        block._grouter_empty_expert_grads = grads
        report.activation = roles.act_spec
        report.graph_breaks_after = reuse.breaks_after if reuse is not None else graph_breaks(block, inputs[0])
        report._analysis = Analysis(breaks_before, report.graph_breaks_after, spec, roles, ffn, outputs)
        return report
    finally:
        block.train(was_training)


def _structure_key(block: nn.Module) -> tuple:
    return type(block), tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())


def rewrite_loop_blocks(model: nn.Module) -> list[LoopBlockRewrite]:
    """Rewrite every loop-style MoE block of ``model`` in place; one report per candidate.

    Blocks with the same structure (class and parameter shapes: the layers of one model) are
    analysed once; each further block is still proven equal on its own weights before its
    forward is replaced. A block whose structure traced without a graph break, or did not run on
    a ``[B, T, H]`` input at all, is not traced again for the next layer (a trace per block was
    most of this step's time on deep models): such blocks are left to the graph pass, which
    proves each site on its own."""
    reports = []
    analysed: dict[tuple, Analysis | None] = {}
    settled: dict[tuple, str] = {}   # structure -> the first block of it: one graph, or not runnable
    for cand in find_loop_block_candidates(model):
        key = _structure_key(cand.block)
        if key in settled:
            log.debug("grouter: %s: left to the graph pass, as %s of the same structure", cand.path, settled[key])
            continue
        report = rewrite_loop_block(cand, reuse=analysed.get(key))
        if report.rewritten and key not in analysed:
            analysed[key] = report._analysis
        if report.graph_breaks_before <= 0:
            settled[key] = cand.path
        if report.gating is None:
            # not an MoE block after all (e.g. attention: a Linear next to [E, ...] weights), or
            # one the graph pass handles because it has no graph break: nothing to tell the user
            log.debug("grouter: %s: %s", cand.path, report.reason)
            continue
        (log.info if report.rewritten else log.warning if report.graph_breaks_before > 0 else log.info)(
            "grouter: %s", report.summary())
        reports.append(report)
    return reports


def restore_loop_blocks(model: nn.Module) -> int:
    """Undo :func:`rewrite_loop_blocks`; returns how many blocks were restored."""
    n = 0
    for m in model.modules():
        if hasattr(m, "_grouter_original_forward"):
            del m.forward
            del m._grouter_original_forward
            grads = m.__dict__.pop("_grouter_empty_expert_grads", None)
            if grads is not None:
                grads.remove()
            n += 1
    return n
