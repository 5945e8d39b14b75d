"""Streaming tokenization: the same directory as ``tokenize_documents(...).save``, for any number
of processes, and a killed run resumes to the same bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grouter_pass.router.data import ByteTokenizer, TokenizedCorpus, tokenize_documents
from grouter_pass.router.tokenizing import STATE_FILE, tokenize_to_directory


def _docs(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["def", "return", "x", "naïve", "東京", "🙂", "", "  ", "\n", "class", "import"]
    return ["".join(rng.choice(words, size=int(rng.integers(0, 40)))) for _ in range(n)]


def _bytes(d):
    return [(d / f).read_bytes() for f in ("tokens.bin", "doc_offsets.bin")]


@pytest.mark.parametrize("max_tokens", [None, 2500])
def test_streaming_equals_in_memory_tokenization(tmp_path, max_tokens):
    docs = _docs()
    want = tokenize_documents(iter(docs), ByteTokenizer(), max_tokens=max_tokens).save(tmp_path / "memory")
    got = tokenize_to_directory(docs, tmp_path / "stream", max_tokens=max_tokens, chunk_documents=17, progress=False)
    assert _bytes(tmp_path / "stream") == _bytes(want)
    assert got.num_tokens == TokenizedCorpus.load(want).num_tokens
    assert not (tmp_path / "stream" / STATE_FILE).exists()


@pytest.mark.slow
def test_two_processes_write_the_same_bytes(tmp_path):
    docs = _docs(600, seed=1)
    tokenize_to_directory(docs, tmp_path / "one", chunk_documents=25, progress=False)
    tokenize_to_directory(docs, tmp_path / "two", chunk_documents=25, processes=2, progress=False)
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "two")


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
    docs = _docs(400, seed=2)
    tokenize_to_directory(docs, tmp_path / "clean", chunk_documents=30, progress=False)
    read = []

    def dies_after_200(items):
        for i, doc in enumerate(items):
            if i == 200:
                raise KeyboardInterrupt
            read.append(i)
            yield doc

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_directory(dies_after_200(docs), tmp_path / "killed", chunk_documents=30, progress=False)
    state = json.loads((tmp_path / "killed" / STATE_FILE).read_text())
    assert state["documents_read"] == 180 and not (tmp_path / "killed" / "tokens.json").exists()
    tokenize_to_directory(docs, tmp_path / "killed", chunk_documents=30, progress=False)
    assert _bytes(tmp_path / "killed") == _bytes(tmp_path / "clean")
    # complete: a second call with the same settings returns it without reading anything
    assert tokenize_to_directory(iter(()), tmp_path / "killed", chunk_documents=30, progress=False).num_tokens == \
        TokenizedCorpus.load(tmp_path / "clean").num_tokens


def test_empty_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty dataset: nothing produced no tokens"):
        tokenize_to_directory(["", ""], tmp_path / "e", source="nothing", progress=False)


def test_cli_tokenize_a_gzipped_jsonl(tmp_path, capsys):
    import gzip

    from grouter_pass.cli import main
    from grouter_pass.router.data import load_corpus

    docs = _docs(120, seed=4)
    src = tmp_path / "c4-like.json.gz"
    with gzip.open(src, "wt", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
    out = str(tmp_path / "t")
    assert main(["tokenize", "--data", str(src), "--split", "train", "--out", out, "--no-progress"]) == 0
    assert "tokenized" in capsys.readouterr().out
    want = load_corpus(str(src), "train").save(tmp_path / "m")
    assert _bytes(tmp_path / "t") == _bytes(want)
