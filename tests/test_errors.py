"""Errors a user can act on: `minidpo train` exits 2 with one line that says what to change, no traceback.

Missing pad token is not an error: the trainer pads with eos (as TRL does; padding is masked out of attention
and loss), and train.py says so in its log.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidpo import embedded, train

REPO = Path(__file__).resolve().parents[1]


def _model_dir(path: Path, tokenizer_edit=None, vocab_size=None) -> Path:
    tok = embedded.build_tokenizer()
    if tokenizer_edit:
        tokenizer_edit(tok)
    model = embedded.build_tiny_model(embedded.build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, intermediate_size=64)
    if vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return embedded.write_jsonl(embedded.make_preference_records(48, seed=2),
                                tmp_path_factory.mktemp("data") / "dpo.jsonl")


def _argv(model, dataset, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(dataset), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_length", "128",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", *extra]


def _fails(capsys, argv, *needles):
    rc = train.run(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minidpo train: error: "), err  # the message is the last line, and one line
    for needle in needles:
        assert needle in last, last
    return last


def test_tokenizer_without_chat_template(tmp_path, pairs, capsys):
    model = _model_dir(tmp_path / "m", lambda t: setattr(t, "chat_template", None))
    _fails(capsys, _argv(model, pairs, tmp_path / "out"), "no chat template", "chat_template")


def test_no_pad_token_falls_back_to_eos_and_says_so(tmp_path, pairs, capsys):
    model = _model_dir(tmp_path / "m", lambda t: setattr(t, "pad_token", None))
    assert train.run(_argv(model, pairs, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "has no pad token: padding with its eos token '<|im_end|>'" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["global_step"] == 2


def test_vocab_size_not_matching_the_model(tmp_path, pairs, capsys):
    model = _model_dir(tmp_path / "m", vocab_size=1000)
    _fails(capsys, _argv(model, pairs, tmp_path / "out"), "1536 tokens", "1000 rows")


def test_max_length_shorter_than_most_prompts(base, pairs, tmp_path, capsys):
    last = _fails(capsys, _argv(base, pairs, tmp_path / "out", "--max_length", "20"),
                  "max_length=20 leaves nothing to score", "set max_length to at least")
    assert "at least 64" in last or "at least 128" in last


def test_max_length_dropping_some_pairs_warns(base, tmp_path, capsys):
    from minidpo.trainer import MiniDPOConfig

    records = [{"prompt": [{"role": "user", "content": "Tell me about the moon." + " And more." * n}],
                "chosen": [{"role": "assistant", "content": "The moon orbits the earth."}],
                "rejected": [{"role": "assistant", "content": "Go away."}]} for n in (0, 0, 0, 0, 0, 0, 0, 40, 40)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    train.check_max_length(records, tok, MiniDPOConfig(output_dir=str(tmp_path), max_length=64, report_to="none"))
    assert "WARNING: max_length=64 leaves nothing to score in 2 of 9 pairs" in capsys.readouterr().out


def test_data_in_a_format_we_do_not_read(base, tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    _fails(capsys, _argv(base, sft, tmp_path / "out"), "cannot tell the format", "prompt/chosen/rejected")
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1\x00\x01binary")
    _fails(capsys, _argv(base, parquet, tmp_path / "out2"), "cannot tell the format")
    empty_dir = tmp_path / "dir"
    empty_dir.mkdir()
    _fails(capsys, _argv(base, empty_dir, tmp_path / "out3"), "without train.jsonl")


def test_output_dir_holding_another_run(base, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    _fails(capsys, _argv(base, pairs, out), "already holds a run", "summary.json", "checkpoint-2",
           "overwrite_output_dir: true", "resume_from_checkpoint")
    # overwrite_output_dir or a resume lets it through the check (the resume itself is resilience.py's business)
    for extra in (["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "true"]):
        script_args, training_args, _ = train.parse(_argv(base, pairs, out, *extra))
        train.check_output_dir(script_args, training_args)
    script_args, training_args, _ = train.parse(_argv(base, pairs, out, "--resume_from_checkpoint", "false"))
    with pytest.raises(Exception, match="already holds a run"):
        train.check_output_dir(script_args, training_args)
    # a directory with only what an earlier failed start left (rejects) is not a run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "rejects.jsonl").write_text("")
    script_args, training_args, _ = train.parse(_argv(base, pairs, fresh))
    train.check_output_dir(script_args, training_args)


def test_missing_files(base, pairs, tmp_path, capsys):
    _fails(capsys, _argv(tmp_path / "no-model", pairs, tmp_path / "out"), "no-model", "does not exist")
    _fails(capsys, _argv(base, tmp_path / "no-data.jsonl", tmp_path / "out"), "no-data.jsonl", "does not exist")
    _fails(capsys, ["--config", str(tmp_path / "no-config.yaml")], "no-config.yaml")


def test_errors_from_the_command_line_have_no_traceback(base, tmp_path):
    """The same through `python minidpo/train.py` in a fresh process."""
    proc = subprocess.run([sys.executable, str(REPO / "minidpo" / "train.py"),
                           *_argv(base, tmp_path / "missing.jsonl", tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("minidpo train: error: dataset_name")
