"""`grouter convert`: a checkpoint in the release's key layout, written as a native directory, gives
the logits and routing of an independent re-implementation of the release's module."""

import pytest
import torch

from grouter_pass.cli import main
from grouter_pass.router import load_grouter
from tests.router.reference_grouter import ReferenceGrouter, randomize

SIZES = dict(vocab=300, d=128, layers=3, heads=2, inter=176, experts=16)   # head dim 64, as released


def _ids(seed: int, batch: int = 3, seq: int = 37) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    ref = randomize(ReferenceGrouter(**SIZES), seed=5).eval()
    path = tmp_path_factory.mktemp("release") / "grouter.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_the_state_dict_has_the_official_keys(release):
    ref, _ = release
    keys = set(ref.state_dict())
    assert "grouter_structure.model.embed_tokens.embed_tokens.weight" in keys
    assert "grouter_structure.score.score.weight" in keys
    assert "grouter_structure.model.layers.2.mlp.down_proj.weight" in keys
    assert "bias" in keys and len(keys) == 3 + 3 * 9 + 1


@pytest.mark.parametrize("seed", [0, 1])
def test_converted_directory_matches_the_reference_module(release, tmp_path, seed, capsys):
    ref, path = release
    assert main(["convert", str(path), "--out", str(tmp_path / "g"), "--top-k", "4"]) == 0
    assert "round trip bitwise equal" in capsys.readouterr().out
    grouter = load_grouter(tmp_path / "g")
    assert (grouter.config.num_heads, grouter.config.num_layers, grouter.config.top_k) == (2, 3, 4)
    ids = _ids(seed)
    with torch.no_grad():
        want, got = ref(ids), grouter(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w_want, i_want = ref.route(ids, 4)
        w_got, i_got = grouter.route(ids)
    # the selection is exact wherever the reference's k-th and (k+1)-th logits are apart
    z = want.sort(dim=-1, descending=True).values
    clear = (z[..., 3] - z[..., 4]) > 1e-4
    assert clear.float().mean() > 0.95
    assert torch.equal(i_got.sort(-1).values[clear], i_want.sort(-1).values[clear])
    torch.testing.assert_close(w_got.sort(-1).values[clear], w_want.sort(-1).values[clear], rtol=1e-5, atol=1e-5)
    assert torch.allclose(w_got.sum(-1), torch.full_like(w_got.sum(-1), 2.5))


def test_selection_bias_routes_like_the_reference(release, tmp_path):
    ref, path = release
    main(["convert", str(path), "--out", str(tmp_path / "g"), "--top-k", "4"])
    grouter = load_grouter(tmp_path / "g", use_selection_bias=True)
    ids = _ids(3)
    with torch.no_grad():
        _, i_want = ref.route(ids, 4, use_bias=True)
        _, i_plain = ref.route(ids, 4)
        _, i_got = grouter.route(ids)
    assert not torch.equal(i_want, i_plain)          # the random bias changes the selection
    assert (i_got.sort(-1).values == i_want.sort(-1).values).float().mean() > 0.99


def test_causal_checkpoint(tmp_path):
    ref = randomize(ReferenceGrouter(**SIZES, causal=True), seed=6).eval()
    torch.save(ref.state_dict(), tmp_path / "causal.pth")
    main(["convert", str(tmp_path / "causal.pth"), "--out", str(tmp_path / "g"), "--causal", "--top-k", "2"])
    grouter = load_grouter(tmp_path / "g")
    ids = _ids(4)
    with torch.no_grad():
        torch.testing.assert_close(grouter(ids), ref(ids), rtol=1e-5, atol=1e-5)
        # causal: a later token cannot change an earlier position's logits
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % SIZES["vocab"]
        torch.testing.assert_close(grouter(changed)[:, :-1], grouter(ids)[:, :-1], rtol=0, atol=0)


def test_wrong_head_count_is_caught_by_the_comparison(release, tmp_path):
    """The check a user can run: with the wrong --num-heads the logits differ from the release's."""
    ref, path = release
    main(["convert", str(path), "--out", str(tmp_path / "g"), "--num-heads", "4"])
    grouter = load_grouter(tmp_path / "g")
    with torch.no_grad():
        assert (grouter(_ids(0)) - ref(_ids(0))).abs().max() > 1e-2


def test_refuses_a_non_empty_directory(release, tmp_path, capsys):
    _, path = release
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    assert main(["convert", str(path), "--out", str(tmp_path / "g")]) == 2
    assert "is not empty (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "g" / "notes.txt").read_text() == "mine"


def test_a_state_dict_of_another_structure_is_refused(tmp_path, capsys):
    torch.save({"grouter_structure.model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.randn(4, 4)},
               tmp_path / "mla.pth")
    assert main(["convert", str(tmp_path / "mla.pth"), "--out", str(tmp_path / "g")]) == 2
    assert "not in the Grouter (mha) layout" in capsys.readouterr().err and not (tmp_path / "g").exists()
