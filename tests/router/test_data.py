import json

import pytest
import torch

from grouter_pass.router import ByteTokenizer, PackedBatches, TokenizedCorpus, load_corpus
from grouter_pass.router.data import iter_documents, stdlib_files, stdlib_split, tokenize_documents


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.encode("hé") == [104, 195, 169]


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    files = stdlib_files()
    assert len(files) > 100 and list(files) == sorted(files)
    splits = {rel: stdlib_split(rel) for rel, _ in files}
    n_val = sum(s == "validation" for s in splits.values())
    assert 0 < n_val < 0.15 * len(files)
    a = load_corpus("stdlib", "validation", max_tokens=20000)
    b = load_corpus("stdlib", "validation", max_tokens=20000)
    assert a.num_tokens == 20000 and (a.tokens == b.tokens).all()
    first_val = next(p for rel, p in files if splits[rel] == "validation")
    assert bytes(a.tokens[:50].astype("uint8")) == first_val.read_bytes()[:50]


def test_jsonl_and_directory_sources(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(40)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d" / "b.txt").write_text("plain text document")
    train = list(iter_documents(tmp_path / "d", "train"))
    val = list(iter_documents(tmp_path / "d", "validation"))
    assert len(train) + len(val) == 41 and val == ["doc 19", "doc 39"]
    corpus = load_corpus(tmp_path / "d", "all")
    assert corpus.num_documents == 41
    assert corpus.document(0).tolist() == list(b"doc 0") + [256]


def test_bad_jsonl_names_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no field 'text'"):
        load_corpus(tmp_path / "x.jsonl", "all")


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty dataset: .*empty.jsonl .* produced no tokens"):
        load_corpus(tmp_path / "empty.jsonl", "all")
    small = tokenize_documents(["abc"], ByteTokenizer())
    with pytest.raises(ValueError, match="has 4 tokens, fewer than one sequence of seq_len=8"):
        PackedBatches(small, 8, 2)


def test_tokenized_directory_round_trip(tmp_path):
    corpus = tokenize_documents(["hello", "world!"], ByteTokenizer(), source="t")
    corpus.save(tmp_path / "tok")
    back = load_corpus(tmp_path / "tok")
    assert back.tokens.tolist() == corpus.tokens.tolist() and back.doc_offsets.tolist() == [0, 6, 13]
    (tmp_path / "tok" / "tokens.bin").write_bytes(b"\0" * 5)
    with pytest.raises(ValueError, match="tokens.bin is truncated or corrupt: 5 bytes, expected 13 x 2 = 26"):
        TokenizedCorpus.load(tmp_path / "tok")


def test_packed_batches_are_a_function_of_the_step():
    corpus = tokenize_documents([bytes(range(200)).decode("latin-1")], ByteTokenizer())
    a, b = PackedBatches(corpus, 8, 3, seed=1), PackedBatches(corpus, 8, 3, seed=1)
    assert torch.equal(a.batch(5), b.batch(5))
    seen = torch.cat([a.batch(s) for s in range(a.windows // 3)])
    assert len({tuple(r.tolist()) for r in seen}) == seen.shape[0]   # one epoch: no window twice


def test_datasets_directory_needs_the_package(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ValueError, match="needs the `datasets` package"):
            load_corpus(tmp_path / "ds", "train")
    else:
        pytest.skip("datasets is installed; its own loader reports the broken directory")
