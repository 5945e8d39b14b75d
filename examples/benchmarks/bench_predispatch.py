"""Pre-dispatch at corpus scale: generate a corpus, tokenize it and pre-dispatch it with P processes,
measuring throughput, peak memory and that a run killed part-way resumes to identical bytes.

    python examples/benchmarks/bench_predispatch.py                    # 200M tokens, 2 processes
    python examples/benchmarks/bench_predispatch.py --tokens 2000000 --work /tmp/pd-small

Stages (each resumable: a finished stage is not redone when the command runs again):

1. **corpus**: ``--tokens`` bytes of generated English-like text (Zipf-distributed words of a
   fixed synthetic lexicon, document lengths log-normal around C4's mean of ~2.2 kB) written as
   C4-style ``part-NNNNN.jsonl.gz`` shards. With the byte tokenizer one byte is one token.
2. **tokenize**: ``grouter tokenize --processes P``.
3. **predispatch**: ``grouter predispatch --processes P`` with a pipeline-bound Grouter (no
   transformer layers: embedding, norm and the E-way score, so the number is the tool's own
   throughput: reading, batching, top-k, writing), E=128, k=8, bf16 weights.
4. **kill and resume**: the same pre-dispatch under another name, killed (SIGKILL, whole process
   group) at a random point, run again to the end, and compared byte for byte with stage 3.
5. **reference Grouter**: the released architecture (width 512, 3 layers, 8 heads, MLP 2736) on a
   ``--reference-tokens`` slice, for the compute-bound throughput a real run sees on this machine.

Peak memory is the largest sum of resident set sizes over the command's process tree (sampled
every 0.1 s), and separately the largest single process. Results are printed and written to
``--json``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
DOC_MEAN_BYTES = 2200


def lexicon(size: int = 30000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2, 2.4, 2.0, 2.0, 1.9,
                     1.0, 1.5, 2.0, 0.8, 0.15, 0.1, 0.15, 0.07][:26])
    freq = freq / freq.sum()
    lengths = np.clip(rng.poisson(4.5, size) + 1, 1, 14)
    return np.array(["".join(rng.choice(letters, n, p=freq)) for n in lengths])


def write_shard(path: Path, words: np.ndarray, target_bytes: int, seed: int) -> int:
    """One gzipped JSON-lines shard of about ``target_bytes`` of text; returns the bytes written."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, words.shape[0] + 1)
    p = 1.0 / ranks ** 1.07
    p /= p.sum()
    total, tmp = 0, path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as fh:
        while total < target_bytes:
            n_bytes = int(min(rng.lognormal(np.log(DOC_MEAN_BYTES) - 0.5, 1.0), 100_000)) + 20
            ids = rng.choice(words.shape[0], max(1, n_bytes // 6), p=p)
            sentence_ends = rng.random(ids.shape[0]) < 0.07
            toks = np.where(sentence_ends, np.char.add(words[ids], "."), words[ids])
            text = " ".join(toks.tolist())
            fh.write(json.dumps({"text": text, "url": f"https://example.org/{seed}/{total}"}) + "\n")
            total += len(text) + 1
    tmp.rename(path)
    return total


def make_corpus(out: Path, tokens: int, shard_bytes: int = 20_000_000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    words = lexicon()
    shards = max(1, -(-tokens // shard_bytes))
    todo = [i for i in range(shards) if not (out / f"part-{i:05d}.jsonl.gz").exists()]
    for i in tqdm(todo, desc="corpus", unit="shard"):
        write_shard(out / f"part-{i:05d}.jsonl.gz", words, min(shard_bytes, tokens - i * shard_bytes), seed=1000 + i)


def run_measured(cmd: list[str], *, kill_after: float | None = None) -> dict:
    """Run ``cmd`` in its own process group; peak RSS of the tree (sum, and largest process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    root = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    killed = False
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        peak_sum, peak_one = max(peak_sum, sum(rss)), max([peak_one, *rss])
        if kill_after is not None and time.perf_counter() - t0 > kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.1)
    out = proc.communicate()[0]
    if not killed and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_sum_gb": peak_sum / 1e9, "peak_rss_max_gb": peak_one / 1e9,
            "killed": killed, "tail": out.strip().splitlines()[-1] if out.strip() else ""}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def grouter_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grouter_pass", *args]


def save_random_grouter(path: Path, **sizes) -> None:
    import torch

    from grouter_pass.router import Grouter, GrouterModelConfig, save_grouter

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    save_grouter(Grouter(GrouterModelConfig(vocab_size=257, num_experts=128, top_k=8, **sizes)), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/grouter-bench-predispatch"))
    ap.add_argument("--reference-tokens", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    w, p = args.work, str(args.processes)
    results: dict = {"tokens": args.tokens, "processes": args.processes, "cpus": os.cpu_count(),
                     "load_before": os.getloadavg()[0],
                     "code": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip()}
    make_corpus(w / "corpus", args.tokens)
    tok = w / "tokens"
    if not (tok / "tokens.json").exists():
        results["tokenize"] = run_measured(grouter_cli("tokenize", "--data", str(w / "corpus"), "--out", str(tok),
                                                       "--processes", p, "--no-progress"))
    save_random_grouter(w / "pipeline-grouter", hidden_size=64, num_heads=1, num_layers=0, intermediate_size=64)
    common = ["--data", str(tok), "--processes", p, "--seq-len", str(args.seq_len), "--no-progress"]
    for name in ("routing", "killed"):
        for suffix in (".json", "_ids.bin", "_weights.bin"):
            (tok / f"{name}{suffix}").unlink(missing_ok=True)
        for f in (tok / f"{name}.shards").glob("*") if (tok / f"{name}.shards").exists() else ():
            f.unlink()
    results["predispatch"] = run_measured(grouter_cli("predispatch", str(w / "pipeline-grouter"), *common))
    full = results["predispatch"]["seconds"]
    kill_at = random.Random(os.getpid()).uniform(0.2, 0.8) * full
    cmd = grouter_cli("predispatch", str(w / "pipeline-grouter"), *common, "--name", "killed")
    first = run_measured(cmd, kill_after=kill_at)
    resumed = run_measured(cmd)
    same = all(sha256(tok / f"routing{s}") == sha256(tok / f"killed{s}") for s in ("_ids.bin", "_weights.bin"))
    results["kill_resume"] = {"killed_after_s": kill_at, "killed": first["killed"],
                              "resumed_s": resumed["seconds"], "identical": same}
    # the released architecture on a slice: the compute-bound throughput
    ref_tok = w / "tokens-reference-slice"
    if not (ref_tok / "tokens.json").exists():
        run_measured(grouter_cli("tokenize", "--data", str(w / "corpus"), "--out", str(ref_tok), "--max-tokens",
                                 str(args.reference_tokens), "--no-progress"))
    save_random_grouter(w / "reference-grouter", hidden_size=512, num_heads=8, num_layers=3, intermediate_size=2736)
    for f in ref_tok.glob("routing*"):
        if f.is_file():
            f.unlink()
    results["reference_grouter"] = run_measured(grouter_cli("predispatch", str(w / "reference-grouter"), "--data",
                                                            str(ref_tok), "--no-resume", "--seq-len",
                                                            str(args.seq_len), "--no-progress"))
    results["load_after"] = os.getloadavg()[0]
    n, ref_n = args.tokens, args.reference_tokens
    routing_gb = sum((tok / f"routing{s}").stat().st_size for s in ("_ids.bin", "_weights.bin")) / 1e9
    print(f"\n{n / 1e6:.0f}M tokens, {args.processes} processes, {os.cpu_count()} CPUs, load "
          f"{results['load_before']:.2f} before / {results['load_after']:.2f} after, code {results['code']}")
    print("| stage | seconds | tokens/s | peak RSS, all processes | largest process |")
    print("|---|---:|---:|---:|---:|")
    for key, count in (("tokenize", n), ("predispatch", n), ("reference_grouter", ref_n)):
        if key in results:
            r = results[key]
            print(f"| {key} | {r['seconds']:.1f} | {count / r['seconds']:,.0f} | {r['peak_rss_sum_gb']:.2f} GB | "
                  f"{r['peak_rss_max_gb']:.2f} GB |")
    kr = results["kill_resume"]
    print(f"routing files: {routing_gb:.2f} GB; killed at {kr['killed_after_s']:.1f} s of {full:.1f} s, resumed in "
          f"{kr['resumed_s']:.1f} s: output {'identical' if kr['identical'] else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not kr["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
