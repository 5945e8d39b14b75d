"""The ``grouter`` subcommands of the Grouter workflow, and the errors they print."""

import json

import pytest
import torch

from grouter_pass.cli import main
from grouter_pass.router import load_grouter, save_grouter
from tests.router.conftest import tiny_grouter


@pytest.fixture
def ckpt(tmp_path):
    return save_grouter(tiny_grouter(vocab_size=257), tmp_path / "g")


@pytest.fixture
def text(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3})
                                            for i in range(60)))
    return d


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fold_tune_predispatch_info(tmp_path, ckpt, text, capsys):
    rc, out, err = run(capsys, "fold", ckpt, "--experts", 3, "--top-k", 2, "--out", tmp_path / "f", "--data", text,
                       "--seq-len", 32)
    assert rc == 0, err
    assert "folded 8 -> 3 experts (top-2)" in out
    folded = load_grouter(tmp_path / "f")
    assert folded.config.num_experts == 3 and sorted(len(g) for g in folded.folding.groups) == [2, 3, 3]
    rc, out, err = run(capsys, "tune", tmp_path / "f", "--out", tmp_path / "t", "--data", text, "--steps", 4,
                       "--seq-len", 32, "--batch-size", 2, "--eval-tokens", 256, "--save-every", 2, "--no-progress")
    assert rc == 0, err
    assert "MaxVio" in out and load_grouter(tmp_path / "t").folding.groups == folded.folding.groups
    rc, out, err = run(capsys, "predispatch", tmp_path / "t", "--data", text, "--out", tmp_path / "tok", "--seq-len",
                       64, "--granularity", "packed", "--weights-dtype", "fp32", "--expect-experts", 3,
                       "--expect-top-k", 2, "--no-progress")
    assert rc == 0, err
    meta = json.loads((tmp_path / "tok" / "routing.json").read_text())
    assert meta["granularity"] == "packed" and meta["weights_dtype"] == "float32" and meta["ids_dtype"] == "uint8"
    rc, out, err = run(capsys, "info", tmp_path / "t")
    assert rc == 0, err
    assert "num_experts: 3" in out and "folded from 8 experts" in out


def test_expand(tmp_path, ckpt, text, capsys):
    rc, out, err = run(capsys, "expand", ckpt, "--experts", 12, "--out", tmp_path / "e", "--data", text,
                       "--seq-len", 32)
    assert rc == 0, err
    assert load_grouter(tmp_path / "e").config.num_experts == 12
    rc, out, err = run(capsys, "info", tmp_path / "e")
    assert rc == 0 and "expanded from 8 experts" in out


def test_distill_from_a_transformers_directory(tmp_path, text, capsys):
    from grouter_pass.router import load_source_model
    from grouter_pass.testing.models import tiny_hf_moe

    tiny_hf_moe("mixtral", vocab_size=257).save_pretrained(tmp_path / "src")
    assert load_source_model(tmp_path / "src", num_layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="source layers 3 is out of range: the model has num_hidden_layers=2"):
        load_source_model(tmp_path / "src", num_layers=3)
    # the first MoE layer is all distillation reads: one of the two layers is loaded (found, not given)
    args = ["distill", "--source", tmp_path / "src", "--out", tmp_path / "d", "--data", text,
            "--hidden-size", 16,
            "--num-heads", 2, "--num-layers", 1, "--intermediate-size", 16, "--steps", 3, "--batch-size", 2,
            "--seq-len", 16, "--warmup", 1, "--save-every", 2, "--eval-tokens", 64, "--no-progress"]
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert "teacher router: layers.0.mlp" in out and "E=8, k=2, 1 source layer(s) loaded" in out
    assert "top-k set agreement" in out
    g = load_grouter(tmp_path / "d")
    assert (g.config.num_experts, g.config.top_k, g.config.vocab_size) == (8, 2, 257)
    from grouter_pass.router.data import ByteTokenizer, tokenizer_fingerprint

    assert g.tokenizer_fingerprint == tokenizer_fingerprint(ByteTokenizer())   # recorded with the Grouter


def expect_error(capsys, pattern, *argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert pattern in err, err


def test_vocab_mismatch_with_tokenizer(tmp_path, text, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"w{i}": i for i in range(300)}
    vocab["[UNK]"] = 300
    (tmp_path / "tok").mkdir()
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tok" / "tokenizer.json"))
    ckpt = save_grouter(tiny_grouter(vocab_size=257), tmp_path / "g")
    expect_error(capsys, "vocabulary mismatch: the tokenizer (", "fold", ckpt, "--experts", 4, "--out",
                 tmp_path / "f", "--data", text, "--tokenizer", tmp_path / "tok")
    expect_error(capsys, "has vocab_size=301 but the Grouter's embedding has vocab_size=257", "info", ckpt,
                 "--tokenizer", tmp_path / "tok")


def test_expert_and_topk_mismatch_with_target(ckpt, text, tmp_path, capsys):
    expect_error(capsys, "the target has num_experts=16 but the Grouter routes to num_experts=8", "predispatch", ckpt,
                 "--data", text, "--out", tmp_path / "tok", "--expect-experts", 16)
    expect_error(capsys, "the target has top_k=4 but the Grouter has top_k=2", "info", ckpt, "--expect-top-k", 4)
    expect_error(capsys, "target_experts=10, source_experts=8", "fold", ckpt, "--experts", 10, "--out",
                 tmp_path / "f", "--data", text)


def test_missing_and_corrupt_files(tmp_path, ckpt, capsys):
    expect_error(capsys, "Grouter checkpoint not found", "info", tmp_path / "nope")
    expect_error(capsys, "dataset not found", "fold", ckpt, "--experts", 4, "--out", tmp_path / "f", "--data",
                 tmp_path / "nodata")
    expect_error(capsys, "not a transformers checkpoint directory", "distill", "--source", tmp_path / "nosrc",
                 "--out", tmp_path / "d")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    expect_error(capsys, "model.safetensors is truncated", "info", ckpt)


def test_wrong_dtype_file(tmp_path, capsys):
    from safetensors.torch import save_file

    g = tiny_grouter()
    (tmp_path / "g").mkdir()
    save_file({k: (v.to(torch.int64) if k == "norm.weight" else v).contiguous() for k, v in g.state_dict().items()},
              tmp_path / "g" / "model.safetensors")
    (tmp_path / "g" / "config.json").write_text(g.config.to_json())
    expect_error(capsys, "tensor norm.weight has dtype I64", "info", tmp_path / "g")


def test_empty_dataset(tmp_path, ckpt, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    expect_error(capsys, "empty dataset", "fold", ckpt, "--experts", 4, "--out", tmp_path / "f", "--data",
                 tmp_path / "empty.jsonl")
    expect_error(capsys, "empty dataset", "predispatch", ckpt, "--data", tmp_path / "empty.jsonl", "--out",
                 tmp_path / "tok")


def test_interrupted_tune_resumes(tmp_path, ckpt, text, capsys, monkeypatch, caplog):
    import grouter_pass.router.tuning as tune_mod

    real = tune_mod.tune

    def interrupted(*args, **kwargs):
        def ctrl_c(step, loss):
            if step == 3:
                raise KeyboardInterrupt
        return real(*args, **kwargs, on_step=ctrl_c)

    argv = ["tune", ckpt, "--out", tmp_path / "t", "--data", text, "--steps", 4, "--seq-len", 32, "--batch-size", 2,
            "--eval-tokens", 256, "--save-every", 2, "--no-progress"]
    monkeypatch.setattr(tune_mod, "tune", interrupted)
    rc, out, err = run(capsys, *argv)
    assert rc == 130 and "run the same command again to resume from step 2" in err
    monkeypatch.setattr(tune_mod, "tune", real)
    caplog.set_level("INFO", logger="grouter_pass.router")
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert "resuming tuning from step 2" in caplog.text


def test_progress_bar_shows_loss_and_throughput():
    import io

    from grouter_pass.router.progress import Progress

    stream = io.StringIO()
    bar = Progress(4, "distill", stream=stream, log_every=0)
    for step in range(1, 5):
        bar.update(step, tokens=100, loss=0.5 / step)
    bar.close()
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("distill: 100%") and "4/4 [" in last and "loss=0.125" in last and "tok/s=" in last


def test_progress_bar_of_a_resumed_run_starts_at_the_checkpoint_step():
    import io

    from grouter_pass.router.progress import Progress

    stream = io.StringIO()
    bar = Progress(10, "tune[score]", start=6, stream=stream, log_every=0)
    bar.update(7, tokens=10, balance=1.0)
    bar.close()
    assert "6/10" in stream.getvalue() and "7/10" in stream.getvalue()


def test_version_and_help_for_every_option(capsys):
    import argparse

    from grouter_pass.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("grouter-pass ")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"options without help text: {missing}"
    text = sub.choices["tune"].format_help()
    assert "(default: 400)" in text and "(default: None)" not in text   # defaults shown, empty ones not


def test_a_result_is_printed_once_not_also_logged(tmp_path, ckpt, text):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "grouter_pass", "fold", str(ckpt), "--experts", "3", "--top-k", "2",
                          "--out", str(tmp_path / "f"), "--data", str(text), "--seq-len", "32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    both = out.stdout + out.stderr
    assert both.count("folded 8 -> 3 experts") == 1, both


def test_predispatch_of_a_reference_pth_takes_top_k_and_scaling_factor_and_records_them(tmp_path, text, capsys,
                                                                                          caplog):
    from tests.router.test_checkpoint import reference_layout

    # a state dict in the reference release's layout, as the published checkpoints are
    g = tiny_grouter(vocab_size=257)
    torch.save(reference_layout(g), tmp_path / "grouter.pth")
    caplog.set_level("WARNING", logger="grouter_pass.router")
    rc, out, err = run(capsys, "predispatch", tmp_path / "grouter.pth", "--data", text, "--out", tmp_path / "tok",
                       "--seq-len", 64, "--no-progress")
    assert rc == 0, err
    assert "does not record k: using top_k=8 (pass --top-k" in caplog.text
    rc, out, err = run(capsys, "predispatch", tmp_path / "grouter.pth", "--data", tmp_path / "tok", "--seq-len", 64,
                       "--no-progress", "--top-k", 3, "--scaling-factor", 1.0)
    assert rc == 0, err
    meta = json.loads((tmp_path / "tok" / "routing.json").read_text())
    assert meta["top_k"] == 3 and meta["scaling_factor"] == 1.0
    rc, out, err = run(capsys, "info", tmp_path / "grouter.pth", "--top-k", 3)
    assert rc == 0 and "top_k: 3" in out


def test_gzipped_json_lines_are_read_and_skipped_files_are_named(tmp_path, caplog):
    import gzip

    from grouter_pass.router.data import iter_documents

    d = tmp_path / "c4"
    d.mkdir()
    with gzip.open(d / "c4-train.00000-of-01024.json.gz", "wt") as fh:
        fh.write("\n".join(json.dumps({"text": f"document {i}", "url": "x"}) for i in range(40)))
    (d / "README.arrow").write_bytes(b"PAR1")
    caplog.set_level("WARNING", logger="grouter_pass.router")
    docs = list(iter_documents(d, "all"))
    assert docs == [f"document {i}" for i in range(40)]
    assert "skipped 1 file(s)" in caplog.text and "README.arrow" in caplog.text
    only_arrow = tmp_path / "pq"
    only_arrow.mkdir()
    (only_arrow / "train.arrow").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"holds no corpus files: 1 file\(s\) skipped .* e\.g\. train\.arrow"):
        list(iter_documents(only_arrow, "all"))


def test_help_loads_neither_the_passes_nor_dynamo():
    """``grouter --help`` (and ``import grouter_pass``) register the ops but load the graph passes,
    Dynamo and Inductor only when something compiles: the commands start in the time torch takes."""
    import subprocess
    import sys

    code = ("import sys, grouter_pass\n"
            "assert 'grouter_pass.passes' not in sys.modules and 'torch._dynamo' not in sys.modules\n"
            "from grouter_pass.cli import build_parser\n"
            "build_parser().format_help()\n"
            "heavy = sorted(m for m in ('torch._dynamo', 'torch._inductor', 'grouter_pass.passes', 'transformers')\n"
            "               if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert grouter_pass.GrouterConfig().exact and callable(grouter_pass.apply_grouter)\n"
            "import grouter_pass.api\n"   # no submodule is called routing: the name stays the function
            "assert callable(grouter_pass.routing) and grouter_pass.routing.__name__ == 'routing'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _word_tokenizer(directory, words, reverse=False):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    ids = list(range(len(words)))[::-1] if reverse else list(range(len(words)))
    vocab = dict(zip(words, ids))
    vocab["[UNK]"] = len(words)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_a_grouter_refuses_data_from_another_tokenizer_of_the_same_vocabulary_size(tmp_path, text, capsys):
    from grouter_pass.router.data import load_tokenizer, tokenizer_fingerprint

    words = ["def", "return", "x", "*", "(", ")", ":", *[f"f{i}" for i in range(60)], *map(str, range(60))]
    tok_a = _word_tokenizer(tmp_path / "a", words)
    tok_b = _word_tokenizer(tmp_path / "b", words, reverse=True)   # same size, other ids
    fp_a, fp_b = (tokenizer_fingerprint(load_tokenizer(t)) for t in (tok_a, tok_b))
    assert fp_a != fp_b and fp_a == tokenizer_fingerprint(load_tokenizer(tok_a))
    g = tiny_grouter(vocab_size=len(words) + 1)
    g.tokenizer_fingerprint = fp_a
    ckpt = save_grouter(g, tmp_path / "g")
    assert load_grouter(ckpt).tokenizer_fingerprint == fp_a   # kept by save/load
    expect_error(capsys, f"tokenizer mismatch: the Grouter was made with tokenizer {fp_a} but the dataset",
                 "predispatch", ckpt, "--data", text, "--tokenizer", tok_b, "--out", tmp_path / "tb", "--no-progress")
    expect_error(capsys, f"uses tokenizer {fp_b}", "info", ckpt, "--tokenizer", tok_b)
    rc, out, err = run(capsys, "predispatch", ckpt, "--data", text, "--tokenizer", tok_a, "--out", tmp_path / "ta",
                       "--no-progress")
    assert rc == 0, err
    assert json.loads((tmp_path / "ta" / "routing.json").read_text())["tokenizer"] == fp_a
    rc, out, err = run(capsys, "info", ckpt)
    assert f"distilled on tokenizer: {fp_a}" in out


def test_the_teacher_loads_the_fewest_layers_that_hold_a_router(tmp_path, caplog):
    """Without --source-layers the teacher loads 1, 2, ... leading layers until the detection
    finds a router: a source whose first layers are dense costs those layers and the first MoE
    layer, never its later layers (whose weights would otherwise set the peak)."""
    from grouter_pass.router import load_teacher
    from grouter_pass.router.capture import NoRouterFound
    from grouter_pass.testing.models import tiny_hf_moe

    ids = torch.randint(0, 257, (2, 8))
    tiny_hf_moe("deepseek_v3", vocab_size=257, num_hidden_layers=4, first_k_dense_replace=2).save_pretrained(
        tmp_path / "dense-first")
    teacher, layers = load_teacher(tmp_path / "dense-first", ids)
    assert layers == 3 and teacher.module_path == "layers.2.mlp"
    assert teacher.model.config.num_hidden_layers == 3 and teacher(ids).shape == (2, 8, teacher.num_experts)
    tiny_hf_moe("mixtral", vocab_size=257).save_pretrained(tmp_path / "moe-first")
    assert load_teacher(tmp_path / "moe-first", ids)[1] == 1
    assert load_teacher(tmp_path / "moe-first", ids, num_layers=2)[0].model.config.num_hidden_layers == 2
    tiny_hf_moe("deepseek_v3", vocab_size=257, num_hidden_layers=2, first_k_dense_replace=2).save_pretrained(
        tmp_path / "dense")
    with pytest.raises(NoRouterFound, match="no MoE gating site"):
        load_teacher(tmp_path / "dense", ids)
