"""Run the mutation list on a copy of the repository and report what caught each mutation.

    python -m tests.mutation                     # every mutation
    python -m tests.mutation --only plan-offsets-exclusive --report docs/mutation-result.md

The copy holds the tracked and untracked (not ignored) files of this checkout, so uncommitted
work is what is mutated; ``grouter_pass/passes`` is linked to the copy's ``passes/`` so that the
copy, not the editable install, is what its tests import (checked before anything runs). Each
mutation is applied alone, its tests are run with ``pytest -x``, and the file is restored. A
mutation counts as caught when a test fails (pytest exit status 1); an error before any test
ran (exit status 2 or more) is reported as such, not as a catch. Before the first mutation the
union of all listed tests runs on the unmutated copy and must pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tests.mutation.mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    mutation: Mutation
    status: str          # "caught", "SURVIVED", "error"
    detail: str
    seconds: float


def copy_repository(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "grouter_pass" / "passes").symlink_to(Path("..") / "passes")


def _env(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def check_copy_is_imported(copy: Path) -> None:
    code = "import grouter_pass, grouter_pass.passes as p; print(grouter_pass.__file__); print(p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True,
                         check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in out):
        raise SystemExit(f"the copy's tests would import {out}, not the copy at {copy}")


def run_pytest(copy: Path, tests: tuple[str, ...], *, first_failure: bool) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if first_failure:
        cmd.insert(4, "-x")
    out = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in out.stdout.splitlines() if ln.startswith("FAILED ")]
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    return out.returncode, (failed[0] if failed else summary)


def apply(copy: Path, m: Mutation) -> str:
    path = copy / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation {m.name}: the snippet occurs {count} times in {m.path} (must be once)")
    path.write_text(text.replace(m.old, m.new))
    return text


def run(mutations: list[Mutation], copy: Path) -> list[Outcome]:
    union = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    print(f"baseline: {len(union)} test files on the unmutated copy ...", flush=True)
    code, detail = run_pytest(copy, union, first_failure=True)
    if code != 0:
        raise SystemExit(f"the tests fail without any mutation ({detail}); fix that first")
    outcomes = []
    for m in tqdm(mutations, desc="mutations", unit="mutation"):
        original = apply(copy, m)
        t0 = time.perf_counter()
        try:
            code, detail = run_pytest(copy, m.tests, first_failure=True)
        finally:
            (copy / m.path).write_text(original)
        status = "caught" if code == 1 else ("SURVIVED" if code == 0 else "error")
        outcomes.append(Outcome(m, status, detail, time.perf_counter() - t0))
        tqdm.write(f"{m.name}: {status} ({detail})")
    return outcomes


def render(outcomes: list[Outcome], version: str) -> str:
    caught = sum(o.status == "caught" for o in outcomes)
    lines = [f"Code version `{version}`: **{caught} of {len(outcomes)} mutations caught**.", "",
             "| mutation | file | defect | tests run | result | first failing test |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        m = o.mutation
        lines.append(f"| `{m.name}` | `{m.path}` | {m.why} | {', '.join(f'`{t}`' for t in m.tests)} | "
                     f"{o.status} ({o.seconds:.0f} s) | `{o.detail}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="names of the mutations to run (default: all)")
    ap.add_argument("--report", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    version = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="grouter-mutation-") as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        check_copy_is_imported(copy)
        for m in chosen:   # every snippet must be found before the long part starts
            (copy / m.path).write_text(apply(copy, m))
        outcomes = run(chosen, copy)
    table = render(outcomes, version)
    print(table)
    if args.report:
        args.report.write_text(table)
    if any(o.status != "caught" for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
