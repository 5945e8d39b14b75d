import pytest
import torch

from grouter_pass.router import Grouter, gate
from tests.router.conftest import tiny_config, tiny_grouter


def test_gate_matches_reference_semantics():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    w, ids = gate(logits, 2, 2.5)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, 2.5 * torch.softmax(torch.tensor([[3.0, 2.0]]), -1))
    # the bias changes the selection only: weights come from the unbiased logits of the selected experts
    w, ids = gate(logits, 2, 2.5, bias)
    assert ids.tolist() == [[3, 1]]
    torch.testing.assert_close(w, 2.5 * torch.softmax(torch.tensor([[0.0, 3.0]]), -1))
    assert ids.dtype == torch.int64 and w.dtype == torch.float32


def test_route_shapes_and_scaling():
    g = tiny_grouter()
    ids = torch.randint(0, 32, (3, 7))
    logits = g(ids)
    assert logits.shape == (3, 7, 8) and logits.dtype == torch.float32
    weights, sel = g.route(ids)
    assert weights.shape == sel.shape == (3, 7, 2)
    top = logits.topk(2, dim=-1)
    assert torch.equal(sel, top.indices)
    # the softmax over the selected logits, scaled (not only weights that sum to the scale)
    torch.testing.assert_close(weights, 2.5 * torch.softmax(top.values, dim=-1))
    w_flat, ids_flat = g.route_flat(ids)
    assert w_flat.shape == (21, 2) and torch.equal(ids_flat, sel.reshape(21, 2))


def test_selection_bias_flag():
    g = tiny_grouter()
    with torch.no_grad():
        g.bias.copy_(torch.tensor([100.0] + [0.0] * 7))
    ids = torch.randint(0, 32, (2, 5))
    assert torch.equal(g.route(ids)[1], g(ids).topk(2, -1).indices)  # without the flag the bias is ignored
    g.config = g.config.replace(use_selection_bias=True)
    assert (g.route(ids)[1][..., 0] == 0).all()


def test_bidirectional_vs_causal():
    ids = torch.randint(0, 32, (1, 6))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 32
    for causal in (False, True):
        torch.manual_seed(0)
        g = Grouter(tiny_config(causal=causal)).eval()
        a, b = g(ids), g(later)
        if causal:
            torch.testing.assert_close(a[:, :-1], b[:, :-1])
        else:
            assert not torch.allclose(a[:, 0], b[:, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_routes_like_the_unpadded_sequence(causal):
    torch.manual_seed(0)
    g = Grouter(tiny_config(causal=causal)).eval()
    ids = torch.randint(0, 32, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(g(padded, attention_mask=mask)[:, :5], g(ids), atol=1e-5, rtol=1e-5)


def test_token_id_outside_vocab_is_refused():
    g = tiny_grouter()
    with pytest.raises(ValueError, match="token id 40 is outside the Grouter's vocab_size=32"):
        g(torch.tensor([[1, 40]]))


def test_config_validation_names_values():
    with pytest.raises(ValueError, match="top_k=9 is larger than num_experts=8"):
        tiny_config(top_k=9)
    with pytest.raises(ValueError, match="hidden_size=15 is not divisible by num_heads=2"):
        tiny_config(hidden_size=15)


def test_bf16_grouter_routes_like_fp32():
    g = tiny_grouter()
    ids = torch.randint(0, 32, (2, 8))
    w32, ids32 = g.route(ids)
    g16 = tiny_grouter().to(torch.bfloat16)
    logits = g16(ids)
    assert logits.dtype == torch.float32   # the score layer runs in bf16, the gate in fp32
    w16, ids16 = g16.route(ids)
    same = (ids16 == ids32).all(-1)
    assert same.float().mean() > 0.9
    # weight by weight where both chose the same experts (their sums equal the scale by construction)
    torch.testing.assert_close(w16[same], w32[same], rtol=5e-2, atol=1e-2)
    assert w32[same].std() > 0.05, "the check needs weights that differ between tokens"
