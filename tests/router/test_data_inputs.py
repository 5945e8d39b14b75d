"""Corpus inputs beyond text and JSON lines: Parquet files and in-memory ``datasets.Dataset`` objects."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grouter_pass.cli import main
from grouter_pass.router.data import ByteTokenizer, TokenizedCorpus, iter_documents, load_corpus

DOCS = [f"document {i}: " + "word " * (i % 7) + "é" * (i % 3) for i in range(53)]


def _write_parquet(path, docs, *, row_group_size=10, column="text"):
    table = pa.table({column: docs, "url": [f"https://example.org/{i}" for i in range(len(docs))]})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_file_reads_like_jsonl(tmp_path):
    _write_parquet(tmp_path / "c4-00000.parquet", DOCS)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "c4.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    for split in ("train", "validation", "all"):
        assert list(iter_documents(tmp_path / "c4-00000.parquet", split)) == list(iter_documents(tmp_path / "j", split))
    assert len(list(iter_documents(tmp_path / "c4-00000.parquet", "validation"))) == 2


def test_parquet_directory_and_missing_column(tmp_path):
    _write_parquet(tmp_path / "a.parquet", DOCS[:20])
    _write_parquet(tmp_path / "b.parquet", DOCS[20:])
    assert list(iter_documents(tmp_path, "all")) == DOCS
    _write_parquet(tmp_path / "other.parquet", DOCS, column="content")
    with pytest.raises(ValueError, match=r"other.parquet: no column 'text' \(columns: \['content', 'url'\]\)"):
        list(iter_documents(tmp_path / "other.parquet", "all"))
    assert list(iter_documents(tmp_path / "other.parquet", "all", text_field="content")) == DOCS


def test_a_damaged_parquet_file_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        list(iter_documents(tmp_path / "bad.parquet", "all"))


def test_tokenize_cli_reads_parquet(tmp_path):
    _write_parquet(tmp_path / "c4.parquet", DOCS)
    assert main(["tokenize", "--data", str(tmp_path / "c4.parquet"), "--out", str(tmp_path / "tok"),
                 "--no-progress"]) == 0
    corpus = TokenizedCorpus.load(tmp_path / "tok")
    want = load_corpus(tmp_path / "c4.parquet", "all", tokenizer=ByteTokenizer())
    assert np.array_equal(corpus.tokens, want.tokens) and np.array_equal(corpus.doc_offsets, want.doc_offsets)


class _Dataset:
    """What iter_documents uses of a ``datasets.Dataset`` (``column_names``, iteration over dict rows,
    ``len``); the ``datasets`` package itself is not a dependency."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = sorted(rows[0])

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)


def test_in_memory_dataset_object(tmp_path):
    ds = _Dataset([{"text": d, "id": i} for i, d in enumerate(DOCS)])
    assert list(iter_documents(ds, "validation")) == [DOCS[19], DOCS[39]]
    corpus = load_corpus(ds, "all")
    assert corpus.num_documents == len(DOCS) and "datasets.Dataset of 53 rows" in corpus.source
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['id', 'text'\]\)"):
        list(iter_documents(ds, "all", text_field="body"))
