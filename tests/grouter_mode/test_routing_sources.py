"""Grouter, precomputed and hash routing in the graph: one routing, one dispatch plan, no routers.

Each source runs end to end on tiny Qwen3-MoE, DeepSeek-V3 and GPT-OSS and is compared with the
unmodified transformers model whose routers are replaced (in eager, in this test only) by the
same fixed routing; a hand-written reference MoE checks the numbers independently of
transformers. Graphs are inspected for one ``dispatch_plan`` node feeding every layer and no
router linear left.
"""

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

import grouter_pass
from grouter_pass import (
    GrouterBackend,
    GrouterConfig,
    GrouterRouting,
    HashRouting,
    PrecomputedRouting,
    apply_grouter,
    trainable_parameters,
)
from grouter_pass.router import Grouter, GrouterModelConfig
from grouter_pass.testing.handwritten import BatchedGatherMoE, TinyMoELM
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids

VOCAB, E, K = 97, 8, 2
#: the router submodule of each MoE block (the reference patches it; the pass never reads names)
ROUTER_CHILD = {"qwen3_moe": "gate", "deepseek_v3": "gate", "gpt_oss": "router"}


def _grouter(vocab: int = VOCAB, experts: int = E, k: int = K, seed: int = 0) -> Grouter:
    torch.manual_seed(seed)
    return Grouter(GrouterModelConfig(vocab_size=vocab, hidden_size=32, num_heads=2, num_layers=1,
                                      intermediate_size=64, num_experts=experts, top_k=k))


def _model(model_type: str, **kw):
    return tiny_hf_moe(model_type, **kw).train()


def _sources():
    g = _grouter()
    return {"grouter": (GrouterRouting(grouter=g), g), "precomputed": (PrecomputedRouting(num_experts=E, top_k=K), g),
            "hash": (HashRouting.random(VOCAB, E, K, seed=1), None)}


def _fixed_routing(kind: str, source, grouter, ids: torch.Tensor):
    if kind == "hash":
        return source.compute(ids)
    w, i = grouter.route(ids)
    return w.reshape(-1, K), i.reshape(-1, K)


def _reference_step(model_type: str, ids: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor):
    """The transformers model in eager with each router returning the fixed routing."""
    model = _model(model_type)
    for name, module in model.named_modules():
        if name.endswith("mlp") and hasattr(module, ROUTER_CHILD[model_type]):
            router = getattr(module, ROUTER_CHILD[model_type])
            router.forward = lambda x, _r=router: (None, weights.to(x.dtype), expert_ids)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _run(model_type: str, kind: str, **model_kw):
    source, grouter = _sources()[kind]
    model = _model(model_type, **model_kw)
    backend = GrouterBackend(GrouterConfig(routing=source, compiler="aot_eager"), keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    ids = tiny_token_ids(2, 6)
    weights, expert_ids = _fixed_routing(kind, source, grouter, ids)
    if kind == "precomputed":
        with grouter_pass.routing(weights.reshape(2, 6, K), expert_ids.reshape(2, 6, K)):
            loss = compiled(ids, labels=ids).loss
    else:
        loss = compiled(ids, labels=ids).loss
    loss.backward()
    return model, backend, loss.detach(), weights, expert_ids, ids


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("kind", ["grouter", "precomputed", "hash"])
def test_every_source_end_to_end_matches_the_model_with_fixed_routing(model_type, kind):
    model, backend, loss, weights, expert_ids, ids = _run(model_type, kind)
    (before, after, report), = backend.graphs[-1:]
    # one routing and one plan, consumed by both MoE layers; the routers are gone
    assert _count(after, torch.ops.grouter.external_routing.default) == 1
    assert _count(after, torch.ops.grouter.dispatch_plan.default) == 1
    assert _count(after, torch.ops.grouter.route.default) == 0
    experts = [n for n in after.graph.nodes if n.target == torch.ops.grouter.moe_experts.default]
    plan = next(n for n in after.graph.nodes if n.target == torch.ops.grouter.dispatch_plan.default)
    assert len(experts) == 2
    for e in experts:   # perm, inv_perm, offsets of every layer come from the one plan
        assert {a.args[0] for a in e.args[2:5]} == {plan}
    # no linear produces E logits any more, and the router weights are read by nothing
    assert not [n for n in after.graph.nodes
                if n.target is torch._C._nn.linear and n.meta["example_value"].shape[-1] == E]
    child = ROUTER_CHILD[model_type]
    assert sum(f"_mlp_modules_{child}_parameters_weight_" in name for name in report.unused_inputs) == 2
    assert all(f"_mlp_modules_{child}_" in name for name in report.unused_inputs)   # + DeepSeek's bias buffers
    router_params = [n for n, _ in model.named_parameters() if f"mlp.{child}." in n]   # weight (+ GPT-OSS bias)
    assert len(report.unused_parameters) == len(router_params) and all(s.routing == kind for s in report.rewritten)
    # router parameters get no gradient; every other parameter does
    for name, p in model.named_parameters():
        if name in router_params:
            assert p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None, name
    # same loss and gradients as transformers with its routers replaced by the fixed routing
    ref_loss, ref_grads = _reference_step(model_type, ids, weights, expert_ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _reference_lm(model: TinyMoELM, ids: torch.Tensor | None, weights: torch.Tensor, expert_ids: torch.Tensor,
                  embeds: torch.Tensor | None = None):
    """TinyMoELM(BatchedGatherMoE) written out with a fixed routing, token by token."""
    h = (model.embed(ids) if embeds is None else embeds).reshape(-1, model.embed.embedding_dim)
    for norm, block in zip(model.norms, model.blocks):
        x = norm(h)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(K):
                e = int(expert_ids[t, j])
                gate, up = (block.up[e] @ x[t]).chunk(2)
                out[t] = out[t] + weights[t, j] * (block.down[e] @ (F.silu(gate) * up))
        h = h + out
    return model.head(h)


@pytest.mark.parametrize("kind", ["grouter", "hash"])
def test_hand_written_reference_with_the_same_fixed_routing(kind):
    source, grouter = _sources()[kind]
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=2)
    compiled = apply_grouter(model, GrouterConfig(routing=source, compiler="aot_eager"))
    ids = tiny_token_ids(2, 5)
    got = compiled(ids)
    got.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert {n for n, p in model.named_parameters() if p.grad is None} == {"blocks.0.router", "blocks.1.router"}
    model.zero_grad(set_to_none=True)
    weights, expert_ids = _fixed_routing(kind, source, grouter, ids)
    want = _reference_lm(model, ids, weights, expert_ids).reshape(got.shape)
    want.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
    params = trainable_parameters(compiled)
    assert len(params) == len(list(model.parameters())) - 2
    assert not model.blocks[0].router.requires_grad


def test_precomputed_routing_new_batches_never_retrace_and_missing_routing_is_an_error():
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=2)
    backend = GrouterBackend(GrouterConfig(routing=PrecomputedRouting(), compiler="aot_eager"))
    compiled = torch.compile(model, backend=backend)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (2, 5), generator=gen)
        expert_ids = torch.rand(10, E, generator=gen).argsort(-1)[:, :K]
        weights = torch.rand(10, K, generator=gen)
        with grouter_pass.routing(weights, expert_ids):
            got = compiled(ids)
        want = _reference_lm(model, ids, weights, expert_ids).reshape(got.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(backend.reports) == 1   # one compile for three batches of routing
    with pytest.raises(RuntimeError, match=r"no routing for this call; run the model inside"):
        compiled(ids)
    with pytest.raises(ValueError, match=r"precomputed routing covers 12 tokens .* but this batch has 10 tokens"):
        with grouter_pass.routing(torch.rand(12, K), torch.zeros(12, K, dtype=torch.long)):
            compiled(ids)


def test_precomputed_routing_works_for_inputs_embeds_and_grouter_routing_refuses_it():
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=1)
    embeds = torch.randn(2, 3, 64)
    expert_ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [0, 7], [3, 3 + 1]])
    weights = torch.rand(6, K)
    compiled = apply_grouter(model, GrouterConfig(routing=PrecomputedRouting(), compiler="aot_eager"))
    with grouter_pass.routing(weights, expert_ids):
        out = compiled(inputs_embeds=embeds)
    torch.testing.assert_close(out, _reference_lm(model, None, weights, expert_ids, embeds).reshape(2, 3, VOCAB),
                               rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    refused = apply_grouter(model, GrouterConfig(routing=GrouterRouting(grouter=_grouter()), compiler="aot_eager"))
    with pytest.raises(Exception, match=r"grouter \(E=8, k=2\) routing reads token ids, but the graph has no "
                                        r"token-id input .*only PrecomputedRouting\(\) can route such a model"):
        refused(inputs_embeds=embeds)


@pytest.mark.parametrize("grouter_kw, message", [
    (dict(experts=16), r"the grouter routing has E=16 experts but site blocks\.0 has E=8"),
    (dict(k=3), r"the grouter routing selects k=3 experts per token but site blocks\.0 uses k=2"),
    (dict(vocab=50), r"the model's token embedding has vocab 97 rows but the grouter routing covers vocab_size=50"),
])
def test_a_grouter_that_does_not_fit_is_refused_naming_both_values(grouter_kw, message):
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=1)
    compiled = apply_grouter(model, GrouterConfig(routing=GrouterRouting(grouter=_grouter(**grouter_kw)),
                                                  compiler="aot_eager"))
    with pytest.raises(Exception, match=message):
        compiled(tiny_token_ids(2, 5))


@pytest.mark.slow
def test_returned_router_logits_become_zeros_and_the_aux_loss_loses_its_gradient(caplog):
    """transformers computes the balance loss after a graph break from router logits the MoE graph
    returns: those become zeros (with a warning), so the loss term is a constant with no gradient
    and the routers are still fully removed."""
    caplog.set_level(logging.INFO, logger="grouter_pass")
    source, grouter = _sources()["grouter"]
    model = _model("qwen3_moe", output_router_logits=True)
    backend = GrouterBackend(GrouterConfig(routing=source, compiler="aot_eager"))
    ids = tiny_token_ids(2, 6)
    out = torch.compile(model, backend=backend)(ids, labels=ids)
    out.loss.backward()
    moe_report = next(r for r in backend.reports if r.shared is not None)
    assert len(moe_report.shared["zeroed_logits"]) == 2 and not moe_report.shared["kept"]
    assert "are returned as zeros" in caplog.text
    assert not out.aux_loss.requires_grad
    weights, expert_ids = _fixed_routing("grouter", source, grouter, ids)
    ref_loss, ref_grads = _reference_step("qwen3_moe", ids, weights, expert_ids)   # no aux loss at all
    torch.testing.assert_close(out.loss - model.config.router_aux_loss_coef * out.aux_loss, ref_loss,
                               rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        assert (p.grad is None) == (".mlp.gate." in name), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_aux_loss_inside_the_graph_is_replaced_by_zero_with_a_log_line(caplog):
    """A balance loss computed in the same graph from the router logits disappears from the loss."""
    caplog.set_level(logging.INFO, logger="grouter_pass")

    class AuxLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = TinyMoELM(functools.partial(BatchedGatherMoE, return_logits=True), layers=1)

        def forward(self, ids):
            h = self.lm.embed(ids)
            out, logits = self.lm.blocks[0](self.lm.norms[0](h))
            probs = torch.softmax(logits, dim=-1)
            balance = 8 * (probs.mean(0) * probs.mean(0)).sum()
            return self.lm.head(h + out).square().mean() + 0.01 * balance

    torch.manual_seed(0)
    model = AuxLM()
    source = HashRouting.random(VOCAB, E, K, seed=1)
    backend = GrouterBackend(GrouterConfig(routing=source, compiler="aot_eager"))
    ids = tiny_token_ids(2, 5)
    loss = torch.compile(model, backend=backend)(ids)
    loss.backward()
    assert backend.reports[-1].shared["aux_losses"]
    assert "removed the auxiliary router loss" in caplog.text
    assert model.lm.blocks[0].router.grad is None
    weights, expert_ids = source.compute(ids)
    want = _reference_lm(model.lm, ids, weights, expert_ids).square().mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_verify_is_refused_outside_exact_mode():
    with pytest.raises(ValueError, match="verify=True compares against the original model"):
        GrouterConfig(routing=HashRouting.random(VOCAB, E, K), verify=True)


def test_explain_in_grouter_mode_reports_routing_agreement_and_what_changed():
    """Precomputed routing equal to the model's own top-k agrees 100%; a shifted one does not."""
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=1)
    ids = tiny_token_ids(2, 5)
    with torch.no_grad():
        x = model.norms[0](model.embed(ids)).reshape(-1, 64)
        weights, own = torch.topk(torch.softmax(x @ model.blocks[0].router, dim=-1), K, dim=-1)
    config = GrouterConfig(routing=PrecomputedRouting(), compiler="eager")
    with grouter_pass.routing(weights, own):
        same = grouter_pass.explain(model, ids, config=config)
    with grouter_pass.routing(weights, (own + 1) % E):
        other = grouter_pass.explain(model, ids, config=config)
    assert [(a.site, a.overlap, a.exact) for a in same.agreement] == [("blocks.0", 1.0, 1.0)]
    assert other.agreement[0].exact < 1.0 and other.agreement[0].overlap < 1.0
    assert same.changes == ["router parameter unused (no gradient): blocks.0.router"]
    text = same.render_text(diff=True)
    assert "Routing agreement: precomputed routing vs the model's own router" in text
    assert "# router: shared by every layer" in text and "# removed: router" in text
    assert 'id="agreement"' in same.to_html()


def test_external_routing_op_passes_opcheck():
    source = HashRouting.random(VOCAB, E, K, seed=3)
    ids = tiny_token_ids(3, 7)
    torch.library.opcheck(torch.ops.grouter.external_routing.default, (ids, source.key, 2, K))
    weights, expert_ids = torch.ops.grouter.external_routing(ids, source.key, 2, K)
    assert expert_ids.shape == (21, K) and torch.equal(expert_ids, source.table[ids.reshape(-1)])
    torch.testing.assert_close(weights, torch.full((21, K), 1 / K))


@pytest.mark.parametrize("weights_dtype,ids_dtype,swapped", [
    (torch.float32, torch.float32, False), (torch.float32, torch.bool, False), (torch.int64, torch.int64, False),
    (torch.int64, torch.float32, True),
])
def test_routing_refuses_non_integer_ids_and_non_float_weights_naming_dtypes(weights_dtype, ids_dtype, swapped):
    weights = torch.rand(2, 3, 2).to(weights_dtype)
    ids = torch.randint(0, 4, (2, 3, 2)).to(ids_dtype)
    with pytest.raises(TypeError, match=f"got weights {weights_dtype} \\[2, 3, 2\\] and ids {ids_dtype}") as err:
        with grouter_pass.routing(weights, ids):
            pass
    assert ("look swapped" in str(err.value)) == swapped


def test_routing_refuses_weights_and_ids_of_different_shapes():
    with pytest.raises(ValueError, match=r"weights \[2, 3, 2\] and ids \[2, 3, 1\] must have the same shape"):
        with grouter_pass.routing(torch.rand(2, 3, 2), torch.zeros(2, 3, 1, dtype=torch.long)):
            pass


def test_precomputed_k_mismatch_names_the_routing_k_and_the_model_k():
    source = PrecomputedRouting()
    with grouter_pass.routing(torch.rand(6, 3), torch.randint(0, 4, (6, 3))):
        with pytest.raises(ValueError, match=r"has k=3 experts per token \(ids \[6, 3\], weights \[6, 3\]\) "
                                             r"but the model's MoE layers use k=2"):
            source.compute(torch.randn(6, 8), 6, 2)


@pytest.mark.parametrize("seed", range(4))
def test_a_balanced_hash_table_balances_the_tokens_it_was_counted_on(seed):
    """Zipf-like counts: the balanced table's busiest expert carries at most the mean plus the
    heaviest token's count, far below a random table's; every row holds k distinct experts."""
    gen = torch.Generator().manual_seed(seed)
    vocab, e, k = 300, 16, 2
    counts = (1e4 / torch.arange(1, vocab + 1).double() ** 1.1)[torch.randperm(vocab, generator=gen)].round()
    table = HashRouting.balanced(counts, e, k).table
    assert table.shape == (vocab, k) and all(len(set(row)) == k for row in table.tolist())
    load = torch.zeros(e, dtype=torch.float64).index_add_(0, table.reshape(-1), counts.repeat_interleave(k))
    mean = counts.sum() * k / e
    assert load.max() <= mean + counts.max()
    random_table = HashRouting.random(vocab, e, k, seed=seed).table
    random_load = torch.zeros(e, dtype=torch.float64).index_add_(0, random_table.reshape(-1),
                                                                 counts.repeat_interleave(k))
    assert load.max() - load.min() < (random_load.max() - random_load.min()) / 2


def test_a_balanced_hash_table_names_bad_counts():
    with pytest.raises(ValueError, match=r"non-negative counts, got torch.float32 \[2, 3\]"):
        HashRouting.balanced(torch.ones(2, 3), 4, 2)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        HashRouting.balanced(torch.ones(10), 4, 5)


def test_a_dropped_configuration_frees_its_routing_source():
    """The source table holds sources weakly: a Grouter network lives as long as the configuration
    (and so the compiled model's backend) that holds it, and a graph still naming a freed source
    gets an error that says so."""
    import gc
    import weakref

    from grouter_pass.runtime import source_of

    table = torch.randint(0, 4, (16, 2))
    config = grouter_pass.GrouterConfig(routing=grouter_pass.HashRouting(table=table))
    key = config.routing.key
    assert source_of(key) is config.routing
    alive = weakref.ref(config.routing)
    del config
    gc.collect()
    assert alive() is None
    with pytest.raises(RuntimeError, match=f"routing source {key} is not registered.*was freed"):
        source_of(key)
