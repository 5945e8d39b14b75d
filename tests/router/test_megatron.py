"""Megatron-LM ``.bin``/``.idx`` datasets, written by Megatron's own builder (megatron-core), imported
as tokenized directories without tokenizing again."""

import megatron.core.datasets.indexed_dataset as indexed_dataset  # make install puts megatron-core in .venv
import numpy as np
import pytest
import torch

from grouter_pass.cli import main
from grouter_pass.router.data import TokenizedCorpus
from grouter_pass.router.megatron import import_megatron, read_megatron_index

# megatron-core's builder converts tensors with numpy.array(tensor, dtype=...), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _megatron(tmp_path, docs_tokens, dtype=np.int32, *, split_sentences=True):
    prefix = str(tmp_path / "c4_text_document")
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs_tokens:
        if split_sentences and len(doc) > 3:    # Megatron's sentence-split documents: several sequences each
            cut = len(doc) // 2
            builder.add_document(torch.tensor(doc), [cut, len(doc) - cut])
        else:
            builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def _random_docs(seed, vocab, n=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 30))).tolist() for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_import_keeps_every_document(tmp_path, dtype):
    docs = _random_docs(1, 257)
    prefix = _megatron(tmp_path, docs, dtype)
    assert read_megatron_index(prefix).num_documents == len(docs)
    corpus = import_megatron(prefix, tmp_path / "tok", tokenizer="byte", chunk_tokens=37, progress=False)
    assert corpus.num_documents == len(docs)
    assert [corpus.document(d).tolist() for d in range(len(docs))] == docs
    assert corpus.tokenizer == "byte" and corpus.tokenizer_fingerprint
    # and Megatron's own reader agrees on every document
    ds = indexed_dataset.IndexedDataset(prefix)
    assert all(np.array_equal(np.concatenate([ds[s] for s in range(a, b)]), corpus.document(d))
               for d, (a, b) in enumerate(zip(ds.document_indices[:-1], ds.document_indices[1:], strict=True)))


def test_megatron_import_cli_and_large_vocab(tmp_path, capsys):
    docs = _random_docs(2, 151936)
    prefix = _megatron(tmp_path, docs, np.int32, split_sentences=False)
    assert main(["import-megatron", prefix + ".idx", "--out", str(tmp_path / "tok"), "--vocab-size", "151936",
                 "--no-progress"]) == 0
    assert f"imported {len(docs)} documents" in capsys.readouterr().out
    corpus = TokenizedCorpus.load(tmp_path / "tok")
    assert corpus.tokens.dtype == np.int32 and corpus.vocab_size == 151936
    assert [corpus.document(d).tolist() for d in range(len(docs))] == docs


def test_megatron_ids_outside_the_vocabulary_are_refused(tmp_path):
    prefix = _megatron(tmp_path, [[1, 2, 3], [4, 300, 5]], np.uint16)
    with pytest.raises(ValueError, match="token 4 has id 300, outside vocab_size=257"):
        import_megatron(prefix, tmp_path / "tok", tokenizer="byte", progress=False)


def test_megatron_damaged_files_are_named(tmp_path):
    prefix = _megatron(tmp_path, _random_docs(3, 257), np.uint16)
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match=r"c4_text_document.bin holds 10 bytes but its index describes \d+ tokens"):
        read_megatron_index(prefix)
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a Megatron index"):
        read_megatron_index(tmp_path / "x")
    with pytest.raises(ValueError, match="give the dataset's tokenizer"):
        import_megatron(prefix, tmp_path / "tok")
