import pytest
import torch

from grouter_pass.router import coactivation_affinity, fold_grouter, greedy_groups, grouter_affinity
from grouter_pass.router.fold import group_sizes
from tests.router.conftest import tiny_grouter


def block_affinity(blocks: list[list[int]], n: int) -> torch.Tensor:
    """Strong affinity inside each block, weak (index-dependent, to break ties) outside."""
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) * 0.01
    a = (a + a.t()) / 2
    for b in blocks:
        for i in b:
            for j in b:
                a[i, j] = 1.0
    a.fill_diagonal_(0)
    return a


def test_coactivation_affinity():
    ids = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 2]])
    p = coactivation_affinity(ids, 4)
    assert p[0, 1] == p[1, 0] == 0.5 and p[2, 3] == 0.25 and p[0, 2] == 0.25 and p[1, 3] == 0
    assert torch.all(p.diagonal() == 0)


def test_groups_even_case():
    blocks = [[0, 5], [1, 7], [2, 4], [3, 6]]
    assert greedy_groups(block_affinity(blocks, 8), 4) == blocks


def test_groups_remainder_case_10_to_4():
    # floor(10/4) = 2 per group, 10 mod 4 = 2 groups (the first two) get a third member
    assert group_sizes(10, 4) == [3, 3, 2, 2]
    blocks = [[0, 4, 9], [1, 5, 8], [2, 6], [3, 7]]
    groups = greedy_groups(block_affinity(blocks, 10), 4)
    assert groups == blocks
    assert sorted(i for g in groups for i in g) == list(range(10))


def test_greedy_follows_summed_affinity():
    # seed 0; 1 has the largest affinity with 0; then 3 has the largest *sum* with {0, 1}, not 2
    a = torch.zeros(6, 6)
    a[0, 1] = a[1, 0] = 5
    a[0, 2] = a[2, 0] = 3
    a[0, 3] = a[3, 0] = 2
    a[1, 3] = a[3, 1] = 2
    assert greedy_groups(a, 2) == [[0, 1, 3], [2, 4, 5]]


def test_folded_logits_are_sums_of_source_logits():
    g = tiny_grouter()
    with torch.no_grad():
        g.bias.copy_(torch.arange(8.0))
    groups = [[0, 4, 7], [1, 5, 6], [2, 3]]
    folded = fold_grouter(g, groups, top_k=2)
    ids = torch.randint(0, 32, (2, 11))
    src, out = g(ids), folded(ids)
    want = torch.stack([src[..., grp].sum(-1) for grp in groups], -1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.bias.detach(), torch.tensor([11.0, 12.0, 5.0]))
    assert folded.config.num_experts == 3 and folded.config.top_k == 2
    assert g.config.num_experts == 8  # source untouched
    # folding again composes the mapping onto the original experts
    twice = fold_grouter(folded, [[0, 2], [1]], top_k=1)
    assert twice.folding.groups == [[0, 2, 3, 4, 7], [1, 5, 6]]


def test_fold_on_data_end_to_end():
    g = tiny_grouter()
    batches = [torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    p = grouter_affinity(g, batches)
    assert p.shape == (8, 8) and p.sum() > 0
    folded = fold_grouter(g, greedy_groups(p, 3), top_k=2)
    assert folded.folding.source_experts == 8 and len(folded.folding.groups) == 3


def test_fold_errors_name_values():
    g = tiny_grouter()
    with pytest.raises(ValueError, match="target_experts=9, source_experts=8"):
        greedy_groups(torch.zeros(8, 8), 9)
    with pytest.raises(ValueError, match="top_k=3 does not fit the folded Grouter's num_experts=2"):
        fold_grouter(g, [[0, 1, 2, 3], [4, 5, 6, 7]], top_k=3)
    with pytest.raises(ValueError, match="each of the 8 source experts exactly once"):
        fold_grouter(g, [[0, 1], [2, 3]])
