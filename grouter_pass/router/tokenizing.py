"""Streaming, multi-process, resumable tokenization into a tokenized dataset directory.

:func:`grouter_pass.router.data.tokenize_documents` holds the whole corpus in memory, which is
fine for the built-in corpus and impossible for C4 (30B tokens are 60 GB as uint16, 120 GB as
int32). :func:`tokenize_to_directory` writes the same directory (``tokens.bin``,
``doc_offsets.bin``, ``tokens.json``) by appending: documents are read in order, tokenized in
chunks by ``processes`` worker processes (at most two chunks per worker in flight, so memory does
not grow with the corpus), and appended in document order, so the result is the same bytes for
any number of processes. After every chunk the files are flushed and a checkpoint
(``tokenize.state.json``) records how many documents were read and how many tokens written; a
killed run resumes there (the files are cut back to the checkpoint, the documents already read
are skipped) and ends with the same bytes. ``tokens.json``, written last, marks the directory
complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grouter_pass.router.checkpoint import write_json_atomic
from grouter_pass.router.data import (
    OFFSETS_FILE,
    TOKENS_FILE,
    TOKENS_META,
    TokenizedCorpus,
    _token_dtype,
    load_tokenizer,
    tokenizer_fingerprint,
)
from grouter_pass.router.progress import Progress

log = logging.getLogger(__name__)

STATE_FILE = "tokenize.state.json"
_worker_tokenizer: Any = None


def _init_worker(spec: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode(tokenizer: Any, docs: list[str]) -> list[np.ndarray]:
    out = []
    for doc in docs:
        ids = tokenizer.encode(doc)
        if ids and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _encode_in_worker(docs: list[str]) -> list[np.ndarray]:
    return _encode(_worker_tokenizer, docs)


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(docs, size)):
        yield chunk



def tokenize_to_directory(docs: Iterable[str], out: str | os.PathLike, *, tokenizer: str | None = "byte",
                          max_tokens: int | None = None, processes: int = 1, chunk_documents: int = 256,
                          source: str = "", resume: bool = True, progress: bool = True) -> TokenizedCorpus:
    """Tokenize ``docs`` (each followed by the end-of-document id, if the tokenizer has one; empty
    documents skipped; stopping at ``max_tokens``) into the directory ``out``; returns it
    memory-mapped.

    Args:
        tokenizer: ``"byte"`` or a local tokenizer directory (each worker loads its own copy).
        processes: worker processes (1: tokenize in this process).
        chunk_documents: documents per task and per checkpoint.
        source: recorded in ``tokens.json``; part of the settings a checkpoint must match.
        resume: continue from ``tokenize.state.json`` when it was made with the same settings;
            a complete directory made with them is returned as it is.
    """
    if processes < 1 or chunk_documents < 1:
        raise ValueError(f"processes ({processes}) and chunk_documents ({chunk_documents}) must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    dtype = _token_dtype(tok.vocab_size)
    settings = {"tokenizer": tok.name, "tokenizer_fingerprint": tokenizer_fingerprint(tok), "source": source,
                "max_tokens": max_tokens, "chunk_documents": chunk_documents}
    meta_path, state_path = out / TOKENS_META, out / STATE_FILE
    if resume and meta_path.is_file() and not state_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("tokenize_settings") == settings:
            log.info("tokenize: %s is complete with these settings; reusing it", out)
            return TokenizedCorpus.load(out)
    state = json.loads(state_path.read_text()) if resume and state_path.is_file() else None
    if state is not None and state.get("settings") != settings:
        log.info("tokenize: the checkpoint in %s was made with other settings; starting over", out)
        state = None
    meta_path.unlink(missing_ok=True)
    read, n_docs, n_tokens = (state["documents_read"], state["documents"], state["tokens"]) if state else (0, 0, 0)
    tokens_fh = open(out / TOKENS_FILE, "r+b" if state else "wb")
    offsets_fh = open(out / OFFSETS_FILE, "r+b" if state else "wb")
    try:
        tokens_fh.truncate(n_tokens * dtype.itemsize)
        offsets_fh.truncate((n_docs + 1) * 8 if state else 0)
        tokens_fh.seek(0, os.SEEK_END)
        offsets_fh.seek(0, os.SEEK_END)
        if state is None:   # offsets start with 0 (a checkpoint's file already holds it)
            offsets_fh.write(np.zeros(1, dtype=np.int64).tobytes())
        if read:
            log.info("tokenize: resuming after %d documents (%d tokens)", read, n_tokens)
        remaining = itertools.islice(iter(docs), read, None)
        bar = Progress(max_tokens, f"tokenize ({processes} process{'es' if processes > 1 else ''})",
                       start=n_tokens, enabled=progress, unit="token")
        results = _encoded_chunks(remaining, tok, tokenizer, processes, chunk_documents)
        for chunk_docs, encoded in results:
            read += chunk_docs
            for ids in encoded:
                if ids.size == 0:
                    continue
                if max_tokens is not None:
                    ids = ids[:max_tokens - n_tokens]
                if ids.size and (int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0):
                    raise ValueError(f"tokenizer {tok.name} produced id {int(ids.max())} outside its vocab_size="
                                     f"{tok.vocab_size}")
                tokens_fh.write(ids.astype(dtype).tobytes())
                n_tokens += int(ids.size)
                n_docs += 1
                offsets_fh.write(np.asarray([n_tokens], dtype=np.int64).tobytes())
                if max_tokens is not None and n_tokens >= max_tokens:
                    break
            tokens_fh.flush()
            offsets_fh.flush()
            write_json_atomic(state_path, {"settings": settings, "documents_read": read, "documents": n_docs,
                                      "tokens": n_tokens})
            bar.update(n_tokens, documents=n_docs)
            if max_tokens is not None and n_tokens >= max_tokens:
                results.close()
                break
        bar.close()
    finally:
        tokens_fh.close()
        offsets_fh.close()
    if n_tokens == 0:
        raise ValueError(f"empty dataset: {source or 'the corpus'} produced no tokens")
    meta = {"num_tokens": n_tokens, "num_documents": n_docs, "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "tokenizer": tok.name, "source": source, "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
            "tokenize_settings": settings}
    write_json_atomic(meta_path, meta)
    state_path.unlink()
    log.info("tokenized %d documents, %d tokens into %s", n_docs, n_tokens, out)
    return TokenizedCorpus.load(out)


def _encoded_chunks(docs: Iterator[str], tok: Any, spec: str | None, processes: int, chunk_documents: int):
    """``(documents in the chunk, their token arrays)`` in document order. With several
    processes, at most ``2 * processes`` chunks are in flight (documents are read only as fast
    as they are tokenized)."""
    if processes == 1:
        for chunk in _chunks(docs, chunk_documents):
            yield len(chunk), _encode(tok, chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker,
                                                initargs=(spec,)) as pool:
        pending: collections.deque = collections.deque()
        chunks = _chunks(docs, chunk_documents)
        try:
            for chunk in itertools.islice(chunks, 2 * processes):
                pending.append((len(chunk), pool.submit(_encode_in_worker, chunk)))
            while pending:
                size, future = pending.popleft()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append((len(nxt), pool.submit(_encode_in_worker, nxt)))
                yield size, future.result()
        finally:
            for _, future in pending:
                future.cancel()
