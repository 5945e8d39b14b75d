import pytest
import torch

from grouter_pass.router import expand_grouter
from grouter_pass.router.expand import kmeans
from tests.router.conftest import tiny_grouter


def batches():
    return [torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_expand_appends_orthogonal_rows_in_the_null_space():
    g = tiny_grouter(num_experts=4)
    big = expand_grouter(g, 10, batches(), seed=0)
    assert big.config.num_experts == 10 and big.expanding["source_experts"] == 4
    w_old, w_new = g.score.weight.detach().double(), big.score.weight.detach().double()
    assert torch.equal(w_new[:4], w_old)
    new = w_new[4:]
    # orthogonal to every old row and to each other, at the mean old row norm
    assert (new @ w_old.t()).abs().max() < 1e-4
    gram = new @ new.t()
    norm = w_old.norm(dim=1).mean()
    torch.testing.assert_close(gram, torch.eye(6, dtype=torch.float64) * norm ** 2, atol=1e-4, rtol=1e-4)
    ids = batches()[0]
    torch.testing.assert_close(big(ids)[..., :4], g(ids))  # old experts' logits are unchanged


def test_expand_refuses_more_rows_than_free_directions():
    g = tiny_grouter(num_experts=8)   # d = 16: at most 8 new orthogonal rows
    with pytest.raises(ValueError, match=r"cannot add 10 experts: only d - rank\(W\) = 16 - 8 = 8 directions"):
        expand_grouter(g, 18, batches())
    with pytest.raises(ValueError, match="target_experts=8, source num_experts=8"):
        expand_grouter(g, 8, batches())


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centers])
    found = kmeans(x, 3, seed=1)
    dist = torch.cdist(found.float(), centers).min(1).values
    assert dist.max() < 0.2
