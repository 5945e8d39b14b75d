"""Pre-dispatch (method notes section 9): run the Grouter over a tokenized dataset once and
store each token's routing beside the tokens, memory-mapped, for training without the Grouter.

Files written into the tokenized dataset's directory (``name`` defaults to ``routing``)::

    {name}.json           format, version, num_tokens, num_experts, top_k, ids/weights dtypes,
                          granularity, seq_len, scaling_factor, use_selection_bias, grouter
                          fingerprint (so a cache is never paired with another Grouter or
                          scaled twice: the stored weights already include scaling_factor)
    {name}_ids.bin        [T, K] uint8 when E <= 256, else int16 (row t = token t of tokens.bin)
    {name}_weights.bin    [T, K] bfloat16 (raw bits) or float32

**Granularity** (the Grouter is bidirectional, so a token's routing depends on the context it
was run with):

* ``"document"`` (default, as the reference ``tools/predispatch.py``): each document is routed
  on its own, in consecutive windows of at most ``seq_len`` tokens (positions restart at 0 in
  every window). Routing does not depend on how documents are later packed, so any
  ``seq_len`` can be read back.
* ``"packed"`` (as the paper's pipeline and the reference online mode): the token stream is cut
  into the same ``seq_len`` windows :class:`PreDispatchedDataset` yields, and each window is
  routed as a whole, across document boundaries. It must be read back with the same
  ``seq_len``; it reproduces exactly what online routing of those packed batches computes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from grouter_pass._logging import RESULT
from grouter_pass.router.checkpoint import grouter_fingerprint, write_json_atomic
from grouter_pass.router.data import TOKENS_FILE, TokenizedCorpus, check_same_tokenizer
from grouter_pass.router.network import Grouter
from grouter_pass.router.progress import Progress

log = logging.getLogger(__name__)

FORMAT, VERSION = "grouter-predispatch", 1
GRANULARITIES = ("document", "packed")
_WEIGHT_DTYPES = {"bfloat16": (torch.bfloat16, np.uint16), "float32": (torch.float32, np.float32)}
_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "float": "float32"}


class Routing(NamedTuple):
    """Per-token routing: ``weights [..., K]`` and ``ids [..., K]`` (the order of ``Grouter.route``)."""

    weights: torch.Tensor
    ids: torch.Tensor


def ids_dtype_for(num_experts: int) -> np.dtype:
    """uint8 while E <= 256, int16 up to 32768 experts."""
    if num_experts <= 256:
        return np.dtype(np.uint8)
    if num_experts <= 1 << 15:
        return np.dtype(np.int16)
    raise ValueError(f"num_experts={num_experts} does not fit int16 expert ids")


def _windows(corpus: TokenizedCorpus, granularity: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` (int64) of the token ranges routed as one sequence each, in token order."""
    if granularity == "packed":
        starts = np.arange(0, corpus.num_tokens, seq_len, dtype=np.int64)
        return starts, np.minimum(starts + seq_len, corpus.num_tokens) - starts
    offsets = np.asarray(corpus.doc_offsets, dtype=np.int64)
    doc_start, doc_end = offsets[:-1], offsets[1:]
    per_doc = (doc_end - doc_start + seq_len - 1) // seq_len            # empty documents: no window
    first = np.concatenate([[0], np.cumsum(per_doc)])[:-1]
    doc = np.repeat(np.arange(per_doc.shape[0]), per_doc)
    starts = doc_start[doc] + (np.arange(doc.shape[0], dtype=np.int64) - first[doc]) * seq_len
    return starts, np.minimum(starts + seq_len, doc_end[doc]) - starts


class _BatchPlan(NamedTuple):
    """Every Grouter forward of a run: batch ``b`` routes the windows ``starts[lo[b]:hi[b]]``, all
    of ``length[b]`` tokens. Arrays, so the plan costs 16 bytes per window and 24 per batch."""

    starts: np.ndarray      # window starts, ordered by length (longest first), then by position
    lo: np.ndarray
    hi: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return int(self.lo.shape[0])

    def shard(self, index: int, count: int) -> _BatchPlan:
        return _BatchPlan(self.starts, self.lo[index::count], self.hi[index::count], self.length[index::count])

    def tokens(self, first: int = 0, last: int | None = None) -> int:
        sl = slice(first, last)
        return int(((self.hi[sl] - self.lo[sl]) * self.length[sl]).sum())


def _batch_plan(corpus: TokenizedCorpus, granularity: str, seq_len: int, batch_tokens: int) -> _BatchPlan:
    """Every Grouter forward of the run, in a fixed order. Windows of one length are batched
    together (at most ``batch_tokens // length`` per batch), longest first, in token order within a
    length. The plan depends only on the data and the settings, so shards split it and a resumed
    run continues it batch for batch."""
    starts, lengths = _windows(corpus, granularity, seq_len)
    order = np.argsort(-lengths, kind="stable")
    starts, lengths = starts[order], lengths[order]
    group_lo = np.flatnonzero(np.diff(lengths, prepend=-1))             # first window of each length
    group_hi = np.append(group_lo[1:], lengths.shape[0])
    lo, hi, length = [], [], []
    for g0, g1 in zip(group_lo.tolist(), group_hi.tolist(), strict=True):
        size = int(lengths[g0])
        per_batch = max(1, batch_tokens // size)
        b0 = np.arange(g0, g1, per_batch, dtype=np.int64)
        lo.append(b0)
        hi.append(np.minimum(b0 + per_batch, g1))
        length.append(np.full(b0.shape[0], size, dtype=np.int64))
    if not lo:
        return _BatchPlan(starts, *(np.zeros(0, np.int64) for _ in range(3)))
    return _BatchPlan(starts, np.concatenate(lo), np.concatenate(hi), np.concatenate(length))


class _RowFile:
    """A ``[rows, k]`` file written a row range at a time with ``pwrite`` (no mapping, so the
    process's memory does not grow with what it wrote). Opened the same way by every shard: it is
    created at its full size if needed and never truncated, so what another shard or an earlier,
    interrupted run wrote stays."""

    def __init__(self, path: Path, dtype: np.dtype, rows: int, k: int) -> None:
        self.row_bytes = np.dtype(dtype).itemsize * k
        size = rows * self.row_bytes
        with open(path, "ab") as fh:
            if fh.tell() != size:
                os.ftruncate(fh.fileno(), size)
        self.fd = os.open(path, os.O_RDWR)

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values).tobytes()
        if os.pwrite(self.fd, data, row * self.row_bytes) != len(data):
            raise OSError(f"short write at row {row} (disk full?)")

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, refused unless ``0 <= I < N``."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in [0, {count})")
    return index, count



@torch.no_grad()
def predispatch(grouter: Grouter, corpus: TokenizedCorpus | str | os.PathLike, *, granularity: str = "document",
                seq_len: int = 4096, weights_dtype: str = "bfloat16", batch_tokens: int = 65536,
                name: str = "routing", progress: bool = True, shard: tuple[int, int] = (0, 1),
                resume: bool = True, checkpoint_batches: int = 16) -> Path | None:
    """Route every token of a tokenized dataset directory and store the routing beside it.

    Args:
        grouter: the (folded/tuned) Grouter; its k, scale and selection bias are used as is. It
            runs where its parameters are (move it to a GPU first for large datasets).
        corpus: a tokenized dataset directory (``TokenizedCorpus.save``), or one loaded from it.
        granularity: ``"document"`` or ``"packed"`` (module docstring).
        seq_len: window length (``packed``: the training sequence length).
        weights_dtype: ``"bfloat16"`` (the paper) or ``"float32"`` (the reference tool).
        batch_tokens: tokens per Grouter forward (windows of equal length are batched).
        shard: ``(i, n)``: this process routes the batches ``i, i + n, i + 2n, ...`` of the run's
            fixed batch plan, writing its rows in place into the shared files; run the ``n``
            shards in any number of processes, on any machines sharing the directory. Whichever
            shard finishes last writes ``{name}.json``, which marks the routing complete.
        resume: continue from this shard's last checkpoint (``{name}.shards/I-of-N.json``,
            written every ``checkpoint_batches`` batches after the rows are flushed) when it was
            made with the same settings; a killed run then ends with the same bytes as one that
            was never interrupted (the routing of a batch depends on its windows only).

    Returns:
        The path of ``{name}.json``, or ``None`` when other shards are still running.

    Memory: tokens are read and routing written with ``pread``/``pwrite`` a batch at a time (no
    mapping), so the process holds one batch (``batch_tokens``) plus the batch plan: 16 bytes per
    window (a document, or each ``seq_len`` piece of a longer one; about 40 while the plan is
    sorted), so about 1 GB for 30B tokens of C4's ~430-token documents.
    Storage: ``T x k`` expert ids (uint8 while E <= 256) plus ``T x k`` weights (bf16 or fp32):
    3 bytes per token and choice in bf16, e.g. 30B tokens at k=8 take 720 GB. Where that is too
    much, route on the fly from the Grouter instead (``GrouterRouting``): one small forward per step.
    """
    if isinstance(corpus, (str, os.PathLike)):
        directory = Path(corpus)
        corpus = TokenizedCorpus.load(directory)
    else:
        raise TypeError("predispatch() takes the directory of a saved TokenizedCorpus (routing is written beside it)")
    weights_dtype = _ALIASES.get(weights_dtype, weights_dtype)
    if weights_dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be bfloat16 or float32, got {weights_dtype!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in [0, {count})")
    if corpus.num_tokens == 0:
        raise ValueError(f"empty dataset: {directory} holds no tokens")
    if corpus.vocab_size > grouter.config.vocab_size:
        raise ValueError(f"vocabulary mismatch: the dataset's tokenizer has vocab_size={corpus.vocab_size} but the "
                         f"Grouter's embedding has vocab_size={grouter.config.vocab_size}")
    check_same_tokenizer(getattr(grouter, "tokenizer_fingerprint", None), corpus.tokenizer_fingerprint,
                         expected_what="the Grouter", got_what=f"the dataset {directory} ({corpus.tokenizer})")
    cfg = grouter.config
    n, k = corpus.num_tokens, cfg.top_k
    ids_np = ids_dtype_for(cfg.num_experts)
    w_torch, w_np = _WEIGHT_DTYPES[weights_dtype]
    meta = {"format": FORMAT, "version": VERSION, "num_tokens": n, "num_experts": cfg.num_experts, "top_k": k,
            "ids_dtype": ids_np.name, "weights_dtype": weights_dtype, "granularity": granularity, "seq_len": seq_len,
            "scaling_factor": cfg.scaling_factor, "use_selection_bias": cfg.use_selection_bias,
            "grouter": grouter_fingerprint(grouter), "vocab_size": cfg.vocab_size,
            "tokenizer": corpus.tokenizer_fingerprint}
    settings = {**meta, "batch_tokens": batch_tokens, "shards": count}
    meta_path = directory / f"{name}.json"
    shards_dir = directory / f"{name}.shards"
    shards_dir.mkdir(exist_ok=True)
    mine = shards_dir / f"{index}-of-{count}.json"
    state = json.loads(mine.read_text()) if resume and mine.is_file() else None
    if state is not None and state.get("settings") != settings:
        log.info("predispatch shard %d/%d: the checkpoint in %s was made with other settings; starting over",
                 index, count, mine)
        state = None
    meta_path.unlink(missing_ok=True)   # the routing is complete only once every shard is
    plan = _batch_plan(corpus, granularity, seq_len, batch_tokens).shard(index, count)
    done_batches = int(state["batches_done"]) if state is not None else 0
    total_tokens, done_tokens = plan.tokens(), plan.tokens(0, done_batches)
    ids_out = _RowFile(directory / f"{name}_ids.bin", ids_np, n, k)
    w_out = _RowFile(directory / f"{name}_weights.bin", w_np, n, k)
    tok_dtype = corpus.tokens.dtype
    tok_fd = os.open(directory / TOKENS_FILE, os.O_RDONLY)

    def window(start: int, length: int) -> np.ndarray:   # read, not mapped: memory stays one batch
        size = length * tok_dtype.itemsize
        return np.frombuffer(os.pread(tok_fd, size, start * tok_dtype.itemsize), dtype=tok_dtype)

    def checkpoint(batches: int) -> None:
        ids_out.sync()
        w_out.sync()
        write_json_atomic(mine, {"settings": settings, "batches_done": batches, "batches": len(plan)})

    grouter.eval()
    device = next(grouter.parameters()).device
    desc = f"predispatch[{granularity}]" + (f" shard {index}/{count}" if count > 1 else "")
    bar = Progress(total_tokens, desc, start=done_tokens, enabled=progress, unit="tok")
    if done_batches:
        log.info("predispatch shard %d/%d: resuming after batch %d of %d", index, count, done_batches, len(plan))
    try:
        for b in range(done_batches, len(plan)):
            length, chunk = int(plan.length[b]), plan.starts[plan.lo[b]:plan.hi[b]].tolist()
            ids = torch.from_numpy(np.stack([window(s, length) for s in chunk]).astype(np.int64))
            weights, sel = grouter.route(ids.to(device))
            weights, sel = weights.cpu(), sel.cpu()
            w_bits = weights.to(w_torch)
            w_arr = w_bits.view(torch.int16).numpy().view(np.uint16) if w_torch is torch.bfloat16 else w_bits.numpy()
            sel_arr = sel.numpy().astype(ids_np)
            for j, s in enumerate(chunk):
                ids_out.write(s, sel_arr[j])
                w_out.write(s, w_arr[j])
            done_tokens += ids.numel()
            bar.update(done_tokens, tokens=ids.numel())
            if (b + 1) % checkpoint_batches == 0:
                checkpoint(b + 1)
        bar.close()
        checkpoint(len(plan))
    finally:
        ids_out.close()
        w_out.close()
        os.close(tok_fd)
    finished = [json.loads(f.read_text()) for f in (shards_dir / f"{i}-of-{count}.json" for i in range(count))
                if f.is_file()]
    if len(finished) < count or any(f["settings"] != settings or f["batches_done"] != f["batches"] for f in finished):
        log.info("predispatch shard %d/%d done; %s is written when the other shards are", index, count, meta_path.name)
        return None
    write_json_atomic(meta_path, meta)
    log.info("pre-dispatched %d tokens (%s) into %s", n, granularity, directory, extra=RESULT)
    return meta_path


def _load_meta(directory: Path, name: str) -> dict[str, Any]:
    path = directory / f"{name}.json"
    if not path.is_file():
        shards = sorted(p.name for p in (directory / f"{name}.shards").glob("*-of-*.json"))
        if shards:
            raise FileNotFoundError(f"the pre-dispatched routing in {directory} is not complete ({path.name} is "
                                    f"written when every shard is done; checkpoints: {shards}): run the missing "
                                    "`grouter predispatch --shard I/N` commands, or the same command again")
        raise FileNotFoundError(f"no pre-dispatched routing in {directory} (missing {path.name}); run "
                                "`grouter predispatch` first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupt: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file (format={meta.get('format')!r}, "
                         f"version={meta.get('version')!r})")
    return meta


class PreDispatchedDataset(torch.utils.data.Dataset):
    """Packed token windows with their stored routing: item ``i`` is
    ``(input_ids [S] int64, Routing(weights [S, K], ids [S, K]))``, windows ``[i*S, (i+1)*S)`` of
    the token stream (the tail shorter than ``S`` is dropped).

    Args:
        directory: the tokenized dataset directory holding ``{name}.json``.
        seq_len: window length (default: the stored ``seq_len``; must equal it for ``packed``).
        raw: keep the stored dtypes (ids uint8/int16, weights bfloat16/float32) to move less
            data; default converts ids to int64 and weights to float32, as ``Grouter.route``.
        expect_experts, expect_top_k: the target's E and k; a mismatch is an error naming both.
        expect_grouter: the Grouter the target would otherwise run online: refuse routing
            computed by another one (its fingerprint is stored in ``{name}.json``).
    """

    def __init__(self, directory: str | os.PathLike, *, seq_len: int | None = None, name: str = "routing",
                 raw: bool = False, expect_experts: int | None = None, expect_top_k: int | None = None,
                 expect_grouter: Grouter | None = None) -> None:
        self.directory = Path(directory)
        self.meta = meta = _load_meta(self.directory, name)
        self.corpus = TokenizedCorpus.load(self.directory)
        n, k = int(meta["num_tokens"]), int(meta["top_k"])
        if self.corpus.num_tokens != n:
            raise ValueError(f"{name}.json covers num_tokens={n} but tokens.bin has {self.corpus.num_tokens}; "
                             "re-run predispatch")
        self.seq_len = int(seq_len or meta["seq_len"])
        if meta["granularity"] == "packed" and self.seq_len != int(meta["seq_len"]):
            raise ValueError(f"routing was computed on packed sequences of seq_len={meta['seq_len']}; reading it with "
                             f"seq_len={self.seq_len} would pair tokens with another context's routing")
        if expect_experts is not None and expect_experts != meta["num_experts"]:
            raise ValueError(f"expert count mismatch: the target has num_experts={expect_experts} but the stored "
                             f"routing has num_experts={meta['num_experts']}")
        if expect_top_k is not None and expect_top_k != k:
            raise ValueError(f"top-k mismatch: the target has top_k={expect_top_k} but the stored routing has "
                             f"top_k={k}")
        if expect_grouter is not None and grouter_fingerprint(expect_grouter) != meta["grouter"]:
            raise ValueError(f"the stored routing was computed by Grouter {meta['grouter']}, not by the given Grouter "
                             f"{grouter_fingerprint(expect_grouter)}; re-run predispatch with it")
        ids_dt = np.dtype(meta["ids_dtype"])
        w_torch, w_np = _WEIGHT_DTYPES[meta["weights_dtype"]]
        self.ids = self._map(f"{name}_ids.bin", ids_dt, n, k)
        self.weights = self._map(f"{name}_weights.bin", np.dtype(w_np), n, k)
        self._w_torch, self.raw, self.top_k = w_torch, raw, k
        self.num_windows = n // self.seq_len
        if self.num_windows == 0:
            raise ValueError(f"empty dataset: {n} tokens are fewer than one sequence of seq_len={self.seq_len}")

    def _map(self, file: str, dtype: np.dtype, n: int, k: int) -> np.ndarray:
        path = self.directory / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        want = n * k * dtype.itemsize
        if path.stat().st_size != want:
            raise ValueError(f"{path} is truncated or corrupt: {path.stat().st_size} bytes, expected {n} tokens x "
                             f"{k} x {dtype.itemsize} = {want}")
        return np.memmap(path, dtype=dtype, mode="r", shape=(n, k))

    def __len__(self) -> int:
        return self.num_windows

    def routing(self, start: int, end: int) -> Routing:
        """Stored routing of tokens ``[start, end)``."""
        ids = torch.from_numpy(np.array(self.ids[start:end]))
        w = torch.from_numpy(np.array(self.weights[start:end]))
        if self._w_torch is torch.bfloat16:
            w = w.view(torch.bfloat16)
        if not self.raw:
            ids, w = ids.long(), w.float()
        return Routing(w, ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Routing]:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        s, e = i * self.seq_len, (i + 1) * self.seq_len
        tokens = torch.from_numpy(np.asarray(self.corpus.tokens[s:e], dtype=np.int64))
        return tokens, self.routing(s, e)

    def document(self, d: int) -> tuple[torch.Tensor, Routing]:
        """One whole document with its routing (document granularity keeps it context-free)."""
        a, b = int(self.corpus.doc_offsets[d]), int(self.corpus.doc_offsets[d + 1])
        return torch.from_numpy(np.asarray(self.corpus.tokens[a:b], dtype=np.int64)), self.routing(a, b)


def predispatch_loader(directory: str | os.PathLike, batch_size: int, *, seq_len: int | None = None,
                       shuffle: bool = False, seed: int = 0, raw: bool = False, num_workers: int = 0,
                       **kwargs: Any) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` yielding ``(input_ids [B, S], Routing(weights [B, S, K], ids [B, S, K]))``."""
    ds = PreDispatchedDataset(directory, seq_len=seq_len, raw=raw, **kwargs)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=num_workers)
