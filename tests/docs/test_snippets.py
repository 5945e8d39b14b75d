"""Every Python snippet in README.md and docs/ runs as written.

The ``python`` blocks of one page run in order in one namespace (a page is a script read top to
bottom), in an empty working directory. A page whose snippets start a process group runs as one
script under ``torchrun`` with two CPU ranks, as the page says to run it. User docs also stand
alone: no issue numbers, no paths outside the repository."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in FENCE.finditer(text)]


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_extractor_finds_the_snippets():
    assert {p.name for p in PAGES_WITH_CODE} >= {"README.md", "grouter.md", "distributed.md", "debugging.md"}
    assert sum(len(python_blocks(p)) for p in PAGES_WITH_CODE) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_every_python_snippet_runs_as_written(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    if any("init_process_group" in code for _, code in blocks):
        script = tmp_path / f"{page.stem}.py"
        script.write_text("\n\n".join(code for _, code in blocks))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              "2", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    torch.manual_seed(0)
    for line, code in blocks:
        exec(compile(code, f"{page.name}:{line}", "exec"), namespace)   # noqa: S102 - the docs' own code


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_user_docs_stand_alone(page):
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} points outside the repository"
    assert not re.search(r"(?im)\bissue\s*#?\d+|(?:^|[\s(\[])#\d+\b", text), f"{page.name} cites an issue number"
