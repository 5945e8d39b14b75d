import json
import struct

import pytest
import torch

from grouter_pass.router import CheckpointError, Folding, load_grouter, save_grouter
from grouter_pass.router.checkpoint import convert_reference_state_dict
from tests.router.conftest import tiny_grouter

IDS = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))


def reference_layout(grouter) -> dict[str, torch.Tensor]:
    """The release's key layout (method notes section 11.3), built from a native state dict."""
    out = {}
    for key, value in grouter.state_dict().items():
        if key == "embed_tokens.weight":
            out["grouter_structure.model.embed_tokens.embed_tokens.weight"] = value
        elif key == "score.weight":
            out["grouter_structure.score.score.weight"] = value
        elif key == "bias":
            out["bias"] = value
        else:
            out["grouter_structure.model." + key] = value
    return out


def test_save_load_roundtrip(tmp_path):
    g = tiny_grouter()
    save_grouter(g, tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["config.json", "model.safetensors"]
    back = load_grouter(tmp_path / "g")
    assert back.config == g.config
    assert torch.equal(back(IDS), g(IDS))


def test_folding_mapping_is_saved(tmp_path):
    from grouter_pass.router import fold_grouter

    folded = fold_grouter(tiny_grouter(), [[0, 1, 2], [3, 4, 5], [6, 7]], top_k=1)
    save_grouter(folded, tmp_path / "f")
    back = load_grouter(tmp_path / "f")
    assert back.folding == Folding(8, [[0, 1, 2], [3, 4, 5], [6, 7]])
    assert torch.equal(back(IDS), folded(IDS))


def test_reference_layout_gives_identical_logits(tmp_path):
    g = tiny_grouter()
    ref = reference_layout(g)
    assert "grouter_structure.model.layers.1.self_attn.q_proj.weight" in ref
    assert "grouter_structure.model.layers.0.mlp.down_proj.weight" in ref
    assert "grouter_structure.model.layers.0.post_attention_layernorm.weight" in ref
    torch.save(ref, tmp_path / "grouter.pth")
    # sizes are read off the shapes; heads cannot be, so give the config (or rely on head dim 64)
    back = load_grouter(tmp_path / "grouter.pth", config=g.config)
    assert torch.equal(back(IDS), g(IDS))
    # and without a config: inferred sizes match
    inferred = load_grouter(tmp_path / "grouter.pth")
    assert (inferred.config.vocab_size, inferred.config.num_layers, inferred.config.num_experts,
            inferred.config.intermediate_size) == (32, 2, 8, 24)
    assert convert_reference_state_dict(ref).keys() == g.state_dict().keys()
    assert load_grouter(tmp_path / "grouter.pth", top_k=3).config.top_k == 3


def test_reference_layout_in_safetensors(tmp_path):
    from safetensors.torch import save_file

    g = tiny_grouter()
    (tmp_path / "r").mkdir()
    save_file({k: v.contiguous() for k, v in reference_layout(g).items()}, tmp_path / "r" / "model.safetensors")
    (tmp_path / "r" / "config.json").write_text(g.config.to_json())
    assert torch.equal(load_grouter(tmp_path / "r")(IDS), g(IDS))
    (tmp_path / "r" / "config.json").unlink()     # a lone weights file: sizes from the shapes
    inferred = load_grouter(tmp_path / "r" / "model.safetensors", num_heads=2, rope_theta=100.0, top_k=2)
    assert torch.equal(inferred(IDS), g(IDS))


def test_truncated_safetensors_is_refused(tmp_path):
    save_grouter(tiny_grouter(), tmp_path / "g")
    f = tmp_path / "g" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"is truncated: its header says the tensor data is \d+ bytes but the "
                                              r"file holds \d+"):
        load_grouter(tmp_path / "g")
    f.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_grouter(tmp_path / "g")


def test_corrupt_header_is_refused(tmp_path):
    save_grouter(tiny_grouter(), tmp_path / "g")
    f = tmp_path / "g" / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"x" * n
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="safetensors header is not valid JSON"):
        load_grouter(tmp_path / "g")


def test_wrong_dtype_is_refused(tmp_path):
    from safetensors.torch import save_file

    g = tiny_grouter()
    state = {k: v.contiguous() for k, v in g.state_dict().items()}
    state["score.weight"] = state["score.weight"].to(torch.int32)
    (tmp_path / "g").mkdir()
    save_file(state, tmp_path / "g" / "model.safetensors")
    (tmp_path / "g" / "config.json").write_text(g.config.to_json())
    with pytest.raises(CheckpointError, match="tensor score.weight has dtype I32; a Grouter needs floating-point"):
        load_grouter(tmp_path / "g")


def test_shape_mismatch_names_values(tmp_path):
    g = tiny_grouter()
    save_grouter(g, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["num_experts"] = 6
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor score.weight has shape \[8, 16\] but the config .*"
                                              r"num_experts=6\) needs \[6, 16\]"):
        load_grouter(tmp_path / "g")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Grouter checkpoint not found"):
        load_grouter(tmp_path / "nope")
    save_grouter(tiny_grouter(), tmp_path / "g")
    (tmp_path / "g" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt: not valid JSON"):
        load_grouter(tmp_path / "g")
    (tmp_path / "g" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="Grouter config not found"):
        load_grouter(tmp_path / "g")
    (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="bad.pth is corrupt or truncated"):
        load_grouter(tmp_path / "bad.pth")


def test_unknown_reference_keys_are_listed():
    with pytest.raises(CheckpointError, match="not in the Grouter \\(mha\\) layout: \\['grouter_structure.model.x'\\]"):
        convert_reference_state_dict({"grouter_structure.model.x": torch.zeros(1)})


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize("corruption", [
    pytest.param(lambda h: _first_tensor(h).update(shape=[3, 5, 7]), id="shape-does-not-match-offsets"),
    pytest.param(lambda h: _first_tensor(h).update(data_offsets=[4, 2]), id="offsets-reversed"),
    pytest.param(lambda h: [v.update(data_offsets=[0, v["data_offsets"][1] - v["data_offsets"][0]])
                            for k, v in h.items() if k != "__metadata__"], id="tensors-overlap"),
    pytest.param(lambda h: _first_tensor(h).update(shape="sixteen"), id="shape-not-a-list"),
])
def test_every_corrupt_safetensors_file_is_a_checkpoint_error_naming_it(tmp_path, corruption):
    save_grouter(tiny_grouter(), tmp_path / "g")
    f = tmp_path / "g" / "model.safetensors"
    _rewrite_header(f, corruption)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_grouter(tmp_path / "g")
