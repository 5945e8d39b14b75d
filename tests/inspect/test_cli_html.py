"""``grouter diff`` end to end in a fresh process, and its HTML page in real headless Chromium.

Chromium comes from the Makefile's test target (Debian's ``chromium`` package). Without it the
browser test fails with instructions, unless ``GROUTER_NO_BROWSER=1`` says to skip it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from grouter_pass.cli import main

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--enable-logging=stderr", "--v=0"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("GROUTER_NO_BROWSER") == "1":
        pytest.skip("GROUTER_NO_BROWSER=1 and no chromium on PATH")
    pytest.fail("headless Chromium is needed for the HTML test: `make test` installs Debian's chromium "
                "(apt-get install chromium); set GROUTER_NO_BROWSER=1 to skip")


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


# the module-scoped fixture below is costly: keep this file on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_cli_html")


@pytest.fixture(scope="module")
def diff_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diff")
    html, js = out / "report.html", out / "report.json"
    proc = subprocess.run([sys.executable, "-m", "grouter_pass", "diff", "--hf-config", "mixtral", "--tokens", "4",
                           "--html", str(html), "--json", str(js)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    return proc, html, js


@pytest.mark.slow
def test_cli_prints_plain_text_when_not_a_terminal_and_writes_json(diff_run):
    proc, _html, js = diff_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\x1b[" not in proc.stdout
    assert "Sites: 2 found, 2 rewritten" in proc.stdout
    assert "Parity, rewritten vs original, forward and backward: PASS" in proc.stdout
    assert "+grouter_route = grouter.route(router_logits" in proc.stdout
    data = json.loads(js.read_text())
    assert data["parity_ok"] and len(data["sites"]) == 2


@pytest.mark.slow
def test_html_page_loads_in_headless_chromium_and_shows_the_tables(diff_run, tmp_path):
    proc, html, _js = diff_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    browser = _chromium()
    url = html.resolve().as_uri()
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == []
    page = dom.stdout
    # the tables, as the browser parsed them
    assert re.search(r'<table class="sites">.*model\.layers\.0\.mlp.*softmax_topk.*model\.layers\.1\.mlp', page, re.S)
    parity = re.search(r'<table class="parity">(.*?)</table>', page, re.S).group(1)
    assert parity.count("<tr") == 1 + 2 + 20   # header, output, input grad, 20 parameter grads
    assert 'class="fail"' not in parity and parity.count('class="ok"') == 22
    # side by side: removed nodes on the left, the grouter ops added on the right
    assert re.search(r'<tr class="(added|changed)"><td class="left">[^<]*</td><td class="right">'
                     r'grouter_route = grouter\.route', page)
    assert re.search(r'<tr class="(removed|changed)"><td class="left">topk = topk\(', page)
    assert "unchanged nodes</summary>" in page
    shot = tmp_path / "page.png"
    run = subprocess.run([browser, *CHROMIUM_FLAGS, f"--screenshot={shot}", "--window-size=1400,1000", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and _console_messages(run.stderr) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_console_check_can_fail(tmp_path):
    """The browser test's console check sees a real console error (so an empty list means something)."""
    browser = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); missingFunction();</script></body></html>")
    run = subprocess.run([browser, *CHROMIUM_FLAGS, "--dump-dom", bad.as_uri()], capture_output=True, text=True,
                         timeout=120)
    messages = _console_messages(run.stderr)
    assert any("boom" in m for m in messages) and any("missingFunction" in m for m in messages)


def test_cli_target_factory_from_a_file(tmp_path, capsys):
    factory = tmp_path / "my_model.py"
    factory.write_text(textwrap.dedent("""
        import torch
        from grouter_pass.testing.handwritten import DenseBmmMoE, TinyMoELM

        def build():
            torch.manual_seed(0)
            model = TinyMoELM(DenseBmmMoE, layers=1)
            return model, {"inputs_embeds": torch.randn(2, 3, 64)}
    """))
    assert main(["diff", f"{factory}:build", "--no-diff", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "Sites: 1 found, 1 rewritten" in out and "PASS" in out
    assert json.loads((tmp_path / "r.json").read_text())["sites"][0]["rewritten"] is True


@pytest.mark.parametrize("argv, message", [
    (["diff"], "give exactly one of TARGET or --hf-config NAME"),
    (["diff", "no_colon_here"], "TARGET must look like module.path:factory"),
    (["diff", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
    (["diff", "grouter_pass.testing.models:NOPE"], "grouter_pass.testing.models has no callable 'NOPE'"),
    (["diff", "--hf-config", "bert"], "no tiny config for model type 'bert'; known: "),
])
def test_cli_refuses_bad_targets_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("grouter diff: error: ") and message in err and "Traceback" not in err
