import json

import numpy as np
import pytest
import torch

from grouter_pass.router import PreDispatchedDataset, TokenizedCorpus, predispatch, predispatch_loader
from grouter_pass.router.predispatching import ids_dtype_for
from tests.router.conftest import tiny_grouter


def corpus_dir(tmp_path, doc_lengths=(23, 7, 40, 1, 17), seed=0):
    rng = np.random.default_rng(seed)
    n = sum(doc_lengths)
    tokens = rng.integers(0, 32, n).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, 32, source="test").save(tmp_path / "data")


@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16"])
def test_document_granularity_round_trips(tmp_path, weights_dtype):
    g = tiny_grouter()
    d = corpus_dir(tmp_path)
    meta = json.loads(predispatch(g, d, granularity="document", seq_len=16, weights_dtype=weights_dtype,
                                  progress=False).read_text())
    assert meta["ids_dtype"] == "uint8" and meta["weights_dtype"] == weights_dtype and meta["scaling_factor"] == 2.5
    ds = PreDispatchedDataset(d, seq_len=8)
    corpus = TokenizedCorpus.load(d)
    wdt = torch.float32 if weights_dtype == "float32" else torch.bfloat16
    for doc in range(corpus.num_documents):
        tokens, routing = ds.document(doc)
        # each document is routed on its own, in windows of at most seq_len = 16 tokens
        for s in range(0, tokens.numel(), 16):
            w, ids = g.route(tokens[None, s:s + 16])
            assert torch.equal(routing.ids[s:s + 16], ids[0])
            torch.testing.assert_close(routing.weights[s:s + 16], w[0].to(wdt).float(), atol=1e-6, rtol=0)
    # raw mode keeps the stored dtypes
    raw = PreDispatchedDataset(d, seq_len=8, raw=True)
    assert raw[0][1].ids.dtype == torch.uint8 and raw[0][1].weights.dtype == wdt


def test_stored_bytes_round_trip_exactly(tmp_path):
    g = tiny_grouter()
    d = corpus_dir(tmp_path)
    predispatch(g, d, granularity="packed", seq_len=22, weights_dtype="bfloat16", progress=False)
    ds = PreDispatchedDataset(d, raw=True)
    ids_file = np.fromfile(d / "routing_ids.bin", dtype=np.uint8).reshape(-1, 2)
    w_file = np.fromfile(d / "routing_weights.bin", dtype=np.uint16).reshape(-1, 2)
    for i in range(len(ds)):
        tokens, routing = ds[i]
        assert torch.equal(tokens, torch.from_numpy(TokenizedCorpus.load(d).tokens[i * 22:(i + 1) * 22].astype(
            np.int64)))
        assert np.array_equal(routing.ids.numpy(), ids_file[i * 22:(i + 1) * 22])
        assert np.array_equal(routing.weights.view(torch.int16).numpy().view(np.uint16), w_file[i * 22:(i + 1) * 22])
        # packed routing is what online routing of that packed window computes
        w, ids = g.route(tokens[None])
        assert torch.equal(routing.ids.long(), ids[0])
        assert torch.equal(routing.weights, w[0].to(torch.bfloat16))


def test_loader_yields_batches(tmp_path):
    d = corpus_dir(tmp_path)
    predispatch(tiny_grouter(), d, seq_len=16, progress=False)
    batches = list(predispatch_loader(d, batch_size=2, seq_len=8))
    input_ids, routing = batches[0]
    assert input_ids.shape == (2, 8) and input_ids.dtype == torch.int64
    assert routing.weights.shape == routing.ids.shape == (2, 8, 2)
    assert routing.ids.dtype == torch.int64 and routing.weights.dtype == torch.float32
    assert sum(b[0].shape[0] for b in batches) == 88 // 8


def test_packed_routing_needs_its_seq_len(tmp_path):
    d = corpus_dir(tmp_path)
    predispatch(tiny_grouter(), d, granularity="packed", seq_len=16, progress=False)
    with pytest.raises(ValueError, match="packed sequences of seq_len=16; reading it with seq_len=8"):
        PreDispatchedDataset(d, seq_len=8)


def test_ids_dtype():
    assert ids_dtype_for(256) == np.uint8 and ids_dtype_for(257) == np.int16


def test_wide_expert_count_uses_int16(tmp_path):
    g = tiny_grouter(num_experts=300, hidden_size=16)
    d = corpus_dir(tmp_path)
    predispatch(g, d, seq_len=16, weights_dtype="fp32", progress=False)
    ds = PreDispatchedDataset(d, raw=True)
    assert ds.meta["ids_dtype"] == "int16" and ds[0][1].ids.dtype == torch.int16
    tokens, routing = ds[0]
    assert torch.equal(routing.ids.long(), g.route(tokens[None])[1][0])


def test_bad_files_and_mismatches_are_refused(tmp_path):
    d = corpus_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no pre-dispatched routing"):
        PreDispatchedDataset(d)
    predispatch(tiny_grouter(), d, seq_len=16, progress=False)
    with pytest.raises(ValueError, match="the target has num_experts=16 but the stored routing has num_experts=8"):
        PreDispatchedDataset(d, expect_experts=16)
    with pytest.raises(ValueError, match="the target has top_k=4 but the stored routing has top_k=2"):
        PreDispatchedDataset(d, expect_top_k=4)
    with pytest.raises(ValueError, match="stored routing was computed by Grouter [0-9a-f]+, not by the given"):
        PreDispatchedDataset(d, expect_grouter=tiny_grouter(seed=1))
    assert len(PreDispatchedDataset(d, expect_grouter=tiny_grouter())) == 5
    f = d / "routing_weights.bin"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"routing_weights.bin is truncated or corrupt: \d+ bytes, expected 88 tokens"):
        PreDispatchedDataset(d)


def test_vocab_mismatch_and_empty_dataset(tmp_path):
    d = corpus_dir(tmp_path)
    with pytest.raises(ValueError, match="tokenizer has vocab_size=32 but the Grouter's embedding has vocab_size=16"):
        predispatch(tiny_grouter(vocab_size=16), d, progress=False)
    TokenizedCorpus(np.zeros(0, np.uint16), np.zeros(1, np.int64), 32).save(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty dataset"):
        predispatch(tiny_grouter(), tmp_path / "empty", progress=False)


def test_document_and_packed_routing_differ_across_a_boundary(tmp_path):
    """The encoder is bidirectional: next to a document boundary, packed routing sees the
    neighbouring document and document routing does not (why granularity is an option)."""
    g = tiny_grouter()
    d = corpus_dir(tmp_path, doc_lengths=(16, 16))
    predispatch(g, d, granularity="document", seq_len=32, weights_dtype="fp32", name="doc", progress=False)
    predispatch(g, d, granularity="packed", seq_len=32, weights_dtype="fp32", name="packed", progress=False)
    doc = PreDispatchedDataset(d, name="doc", seq_len=32)[0][1]
    packed = PreDispatchedDataset(d, name="packed", seq_len=32)[0][1]
    assert not torch.allclose(doc.weights, packed.weights)
    tokens = PreDispatchedDataset(d, name="doc", seq_len=32)[0][0]
    torch.testing.assert_close(doc.weights[:16], g.route(tokens[None, :16])[0][0])
    torch.testing.assert_close(packed.weights, g.route(tokens[None])[0][0])


def _routing_bytes(d, name="routing"):
    return (d / f"{name}_ids.bin").read_bytes(), (d / f"{name}_weights.bin").read_bytes()


def _many_docs(tmp_path, name):
    rng = np.random.default_rng(3)
    return corpus_dir(tmp_path / name, doc_lengths=tuple(int(x) for x in rng.integers(1, 30, 60)), seed=3)


@pytest.mark.parametrize("granularity", ["document", "packed"])
def test_shards_write_the_same_bytes_as_one_process(tmp_path, granularity):
    g = tiny_grouter()
    whole, split = _many_docs(tmp_path, "whole"), _many_docs(tmp_path, "split")
    kw = dict(granularity=granularity, seq_len=16, batch_tokens=48, progress=False)
    assert predispatch(g, whole, **kw) == whole / "routing.json"
    # shards in any order; only the last to finish marks the routing complete
    assert predispatch(g, split, shard=(2, 3), **kw) is None
    assert predispatch(g, split, shard=(0, 3), **kw) is None and not (split / "routing.json").exists()
    assert predispatch(g, split, shard=(1, 3), **kw) == split / "routing.json"
    assert _routing_bytes(split) == _routing_bytes(whole)
    assert json.loads((split / "routing.json").read_text()) == json.loads((whole / "routing.json").read_text())


def test_a_killed_run_resumes_to_identical_bytes(tmp_path, monkeypatch):
    g = tiny_grouter()
    clean, killed = _many_docs(tmp_path, "clean"), _many_docs(tmp_path, "killed")
    kw = dict(seq_len=16, batch_tokens=32, progress=False, checkpoint_batches=3)
    predispatch(g, clean, **kw)
    real, calls = type(g).route, []

    def dies_on_the_eighth_batch(self, ids):
        calls.append(ids.shape)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(type(g), "route", dies_on_the_eighth_batch)
    with pytest.raises(KeyboardInterrupt):
        predispatch(g, killed, **kw)
    assert not (killed / "routing.json").exists()
    state = json.loads((killed / "routing.shards" / "0-of-1.json").read_text())
    assert state["batches_done"] == 6   # the last checkpoint before the kill
    monkeypatch.setattr(type(g), "route", real)
    resumed = []
    monkeypatch.setattr(type(g), "route", lambda self, ids: resumed.append(ids.shape) or real(self, ids))
    predispatch(g, killed, **kw)
    assert len(resumed) == state["batches"] - 6   # only the batches after the checkpoint ran again
    assert _routing_bytes(killed) == _routing_bytes(clean)


def test_shard_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    g = tiny_grouter()
    d = _many_docs(tmp_path, "d")
    predispatch(g, d, seq_len=16, progress=False)
    other = tiny_grouter(seed=1)
    predispatch(other, d, seq_len=16, progress=False)   # every batch again, with the other Grouter
    fresh = _many_docs(tmp_path, "fresh")
    predispatch(other, fresh, seq_len=16, progress=False)
    assert _routing_bytes(d) == _routing_bytes(fresh)


def test_cli_predispatch_with_two_processes(tmp_path, capsys):
    from grouter_pass.cli import main
    from grouter_pass.router.checkpoint import save_grouter

    g = tiny_grouter()
    ckpt = tmp_path / "g"
    save_grouter(g, ckpt)
    one, two = _many_docs(tmp_path, "one"), _many_docs(tmp_path, "two")
    assert main(["predispatch", str(ckpt), "--data", str(one), "--seq-len", "16", "--no-progress"]) == 0
    assert main(["predispatch", str(ckpt), "--data", str(two), "--seq-len", "16", "--processes", "2",
                 "--no-progress"]) == 0
    assert _routing_bytes(one) == _routing_bytes(two)
    assert main(["predispatch", str(ckpt), "--data", str(one), "--shard", "3", "--no-progress"]) != 0
    assert "--shard takes I/N (e.g. 0/4), got '3'" in capsys.readouterr().err
