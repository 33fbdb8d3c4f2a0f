"""minidpo/train.py end to end on the embedded tiny model: launchers, save and reload, one-line errors, LoRA.

Everything is built in tmp_path with minidpo.embedded; nothing is downloaded (subprocesses run with the Hub
offline switches on and a private HF_HOME, so no user-level accelerate config or cache leaks in).
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, SUBPROCESS_TIMEOUT, assert_one_line_error, save_small_model, subprocess_env
from records_data import to_trl
from references import seq_logp
from minidpo import embedded, train
from minidpo.errors import UserError

LOG2 = math.log(2)  # the sigmoid DPO loss of every pair at step 0, where policy == reference
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Small enough for 2 CPU cores, learnable enough that 16 steps move the loss clearly below log 2.
TINY = {
    "eval_fraction": 0.2,
    "learning_rate": 5.0e-3,
    "lr_scheduler_type": "constant",
    "max_steps": 16,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "max_length": 128,
    "logging_steps": 4,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "seed": 0,
}


def write_config(path: Path, assets: Path, output_dir: Path, **overrides) -> Path:
    """A training YAML over the tiny assets: TINY, then `overrides` (output_dir among them)."""
    cfg = {"model_name_or_path": str(assets / "base"), "dataset_name": str(assets / "dpo.jsonl"),
           "output_dir": str(output_dir), **TINY, **overrides}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def launch(cmd: list, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def minidpo_cmd() -> list:
    exe = shutil.which("minidpo")
    return [exe] if exe else [sys.executable, "-m", "minidpo.cli"]


def logp(model, ids, mask) -> float:
    """Length-averaged log-prob of the scored tokens, from full-vocabulary logits (independent of TRL)."""
    with torch.no_grad():
        return seq_logp(model, ids, mask).item()


def margin(model, pair) -> float:
    return (logp(model, pair["chosen_input_ids"], pair["chosen_loss_mask"])
            - logp(model, pair["rejected_input_ids"], pair["rejected_loss_mask"]))


# ---------------------------------------------------------------------------------------------------------
# Training through the launchers


def test_accelerate_launch_trains_saves_and_reloads(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minidpo.masking import encode_pair

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_assets, out)
    proc = launch(["accelerate", "launch", "--num_processes", "1", "minidpo/train.py", "--config", str(cfg)],
                  tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "minimind format" in proc.stdout  # the dataset format is detected and said
    for noise in ("is_gradient_checkpointing", "pin_memory", "missing keys"):
        assert noise not in proc.stderr, noise

    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "summary.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "minidpo" in card and "length_normalize" in card
    assert f"`{tiny_assets / 'base'}` (a local model)" in card and "None" not in card

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == TINY["max_steps"]
    train_metrics, final_eval = summary["final_train"], summary["final_eval"]
    # Loss goes down: it is log 2 at step 0 (policy == reference), its run average is below that and the last
    # logged value below the average.
    assert train_metrics["loss"] < train_metrics["train_loss"] < LOG2 - 0.01, train_metrics
    assert final_eval["eval_loss"] < LOG2 - 0.02, final_eval
    assert final_eval["eval_rewards/accuracies"] >= 0.9, final_eval

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "base")
    assert len(tok) == len(AutoTokenizer.from_pretrained(tiny_assets / "base"))
    assert tok.chat_template and tok.eos_token == embedded.IM_END
    trained, orig = model.state_dict(), base.state_dict()
    assert trained.keys() == orig.keys()
    assert any(not torch.equal(trained[k], orig[k]) for k in orig), "saved weights equal the base model"
    # The reloaded model prefers the chosen answer of a held-out-style pair more than the base model does.
    pair = encode_pair(to_trl(embedded.make_preference_records(1, seed=99)[0]), tok, max_length=128)
    assert margin(model, pair) > margin(base, pair)


def test_python_train_py_runs_the_same_code(tiny_assets, tmp_path):
    """`python minidpo/train.py`: the file runs as a script (minidpo/ first on sys.path shadows nothing), the
    command line overrides the YAML, and a mistake is one line."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_assets, out)
    proc = launch([sys.executable, "minidpo/train.py", "--config", str(cfg), "--max_steps", "2",
                   "--eval_fraction", "0", "--logging_steps", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 2 and summary["final_eval"] == {}
    assert (out / "model.safetensors").is_file()

    proc = launch([sys.executable, "minidpo/train.py", "--config", str(cfg), "--output_dir", str(tmp_path / "out2"),
                   "--dataset_name", str(tmp_path / "missing.jsonl")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "minidpo train: error: dataset_name", "missing.jsonl", "does not exist")


def test_minidpo_train_is_train_py(tiny_assets, tmp_path, monkeypatch):
    from minidpo import cli

    # argv level: `minidpo train ARGS` parses ARGS with train.py's own parser and runs train.main on the result.
    seen = []
    monkeypatch.setattr(train, "main", lambda *parsed: seen.append(parsed) or {})
    cfg = write_config(tmp_path / "tiny.yaml", tiny_assets, tmp_path / "out")
    assert cli.main(["train", "--config", str(cfg), "--beta", "0.2"]) == 0
    (script_args, training_args, model_args), = seen
    assert training_args.beta == 0.2 and training_args.max_steps == TINY["max_steps"]
    assert (script_args, training_args, model_args) == tuple(train.parse(["--config", str(cfg), "--beta", "0.2"]))
    monkeypatch.undo()

    # process level: the installed command parses the same dataclasses and fails the same clear way.
    cfg = write_config(tmp_path / "bad.yaml", tiny_assets, tmp_path / "out", lerning_rate=1e-3)
    proc = launch(minidpo_cmd() + ["train", "--config", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_one_line_error(proc.stderr, "minidpo train: error:", "lerning_rate")


# ---------------------------------------------------------------------------------------------------------
# Clear errors: exit 2, one line, no traceback


def _small_vocab_model(assets: Path, tmp_path: Path) -> Path:
    """A model whose embedding has fewer rows than the tokenizer next to it has tokens."""
    return save_small_model(tmp_path / "small-vocab", vocab_size=1024)


def _neither_format(tmp_path: Path) -> Path:
    path = tmp_path / "neither.jsonl"
    path.write_text('{"question": "hi", "answer": "hello"}\n{"text": "no pairs here"}\n', encoding="utf-8")
    return path


def _parquet(tmp_path: Path) -> Path:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1\x00\x01binary")
    return path


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "dir").mkdir()
    return tmp_path / "dir"


def _holding_a_run(out: Path) -> Path:
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    return out


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path / "a-file"


def _string_prompts(tmp_path: Path) -> Path:
    """A TRL file whose prompts are plain strings beside message lists: every line rejected as bad_type."""
    path = tmp_path / "trl.jsonl"
    record = {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello!"}],
              "rejected": [{"role": "assistant", "content": "Go away."}]}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(3)), encoding="utf-8")
    return path


def _in_use(tmp_path: Path) -> Path:
    """An output_dir whose lock a live process on this host holds (this one)."""
    import os
    import socket

    out = tmp_path / "busy"
    out.mkdir()
    (out / ".minidpo.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                    "started": "now"}))
    return out


ERROR_CASES = {
    # name: (overrides as a function of (assets, tmp_path), words the one-line message must contain)
    "unknown-config-key": (lambda a, t: {"lerning_rate": 1e-3},
                           ["unknown option in", "lerning_rate (did you mean learning_rate?)", "minidpo train --help"]),
    "eval-fraction-above-one": (lambda a, t: {"eval_fraction": 1.5}, ["eval_fraction must be in [0, 1), got 1.5"]),
    "eval-fraction-negative": (lambda a, t: {"eval_fraction": -0.5}, ["eval_fraction must be in [0, 1), got -0.5"]),
    "trl-file-with-string-prompts": (lambda a, t: {"dataset_name": str(_string_prompts(t))},
                                     ["no usable training pair in", "all 3 lines rejected as bad_type",
                                      "'prompt' must be a list of messages", "rejects.jsonl"]),
    "lora-target-with-a-typo": (lambda a, t: {"use_peft": True, "lora_target_modules": ["q_proj", "v_prj"]},
                                ["lora_target_modules: v_prj matches no module", "v_proj"]),
    "prepared-data-cache-not-writable": (lambda a, t: {"dataset_cache_dir": str(_a_file(t) / "cache")},
                                         ["cannot write the prepared pairs to", "Not a directory",
                                          "set dataset_cache_dir (or MINIDPO_CACHE)"]),
    "missing-dataset": (lambda a, t: {"dataset_name": str(t / "nowhere.jsonl")}, ["nowhere.jsonl", "does not exist"]),
    "dataset-in-neither-format": (lambda a, t: {"dataset_name": str(_neither_format(t))},
                                  ["neither.jsonl", "cannot tell the format", "prompt/chosen/rejected"]),
    "dataset-binary": (lambda a, t: {"dataset_name": str(_parquet(t))}, ["cannot tell the format"]),
    "dataset-dir-without-train-jsonl": (lambda a, t: {"dataset_name": str(_empty_dir(t))}, ["without train.jsonl"]),
    "tokenizer-larger-than-embedding": (lambda a, t: {"model_name_or_path": str(_small_vocab_model(a, t))},
                                        ["1536 tokens", "1024 rows"]),
    "model-path-missing": (lambda a, t: {"model_name_or_path": str(t / "no-such-model")},
                           ["no-such-model", "does not exist"]),
    "tokenizer-without-chat-template": (
        lambda a, t: {"model_name_or_path": str(save_small_model(t / "m", lambda tok: setattr(tok, "chat_template",
                                                                                              None)))},
        ["no chat template", "chat_template"]),
    "output-dir-in-use": (lambda a, t: {"output_dir": str(_in_use(t))},
                          ["in use by another minidpo run", "pid", "started now"]),
    "output-dir-is-a-file": (lambda a, t: {"output_dir": str(_a_file(t))}, ["is a file, not a directory"]),
    "output-dir-not-writable": (lambda a, t: {"output_dir": "/sys/minidpo-test-out"}, ["cannot be written"]),
    "beta-zero": (lambda a, t: {"beta": 0.0}, ["beta must be > 0"]),
    "empty-think-without-minimind-order": (lambda a, t: {"empty_think_keep_ratio": 0.2},
                                           ["empty_think_keep_ratio < 1", "minimind_data_order: true"]),
    "empty-think-without-markers": (
        lambda a, t: {"empty_think_keep_ratio": 0.2, "minimind_data_order": True,
                      "model_name_or_path": str(save_small_model(t / "m",
                                                                 lambda tok: setattr(tok, "bos_token", None)))},
        ["empty_think_keep_ratio < 1", "MiniMind's markers"]),
    "output-dir-holding-another-run": (lambda a, t: {"output_dir": str(_holding_a_run(t / "run"))},
                                       ["already holds a run", "summary.json", "checkpoint-2",
                                        "overwrite_output_dir: true", "resume_from_checkpoint"]),
}


def _files(root: Path) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_clear_errors(case, tiny_assets, tmp_path, capfd):
    """Exit 2, one line, no traceback, and nothing that was there before touched (nothing written but rejects)."""
    overrides, needles = ERROR_CASES[case]
    cfg = write_config(tmp_path / "bad.yaml", tiny_assets, **{"output_dir": tmp_path / "out",
                                                               **overrides(tiny_assets, tmp_path)})
    before = _files(tmp_path)
    capfd.readouterr()
    assert train.run(["--config", str(cfg)]) == 2
    assert_one_line_error(capfd.readouterr().err, "minidpo train: error:", *needles)
    after = _files(tmp_path)
    assert {k: after.get(k) for k in before} == before
    assert [k for k in after if k not in before and not k.endswith("rejects.jsonl")] == []


def test_yaml_and_value_errors_are_one_line(tiny_assets, tmp_path, capfd):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.1\nlearning_rate: [1, 2\nmax_steps: 3\n", encoding="utf-8")
    assert train.run(["--config", str(bad)]) == 2
    assert_one_line_error(capfd.readouterr().err, f"{bad}, line 3, column 10: not valid YAML")
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out")
    assert train.run(["--config", str(cfg), "--learning_rate", "abc"]) == 2
    err = capfd.readouterr().err
    assert_one_line_error(err, "--learning_rate", "invalid float value: 'abc'")
    assert "usage:" not in err


def test_missing_config_file(tmp_path, capfd):
    assert train.run(["--config", str(tmp_path / "no-config.yaml")]) == 2
    assert_one_line_error(capfd.readouterr().err, "minidpo train: error:", "no-config.yaml")


def test_max_length_shorter_than_most_prompts(tiny_assets, tmp_path, capfd):
    cfg = write_config(tmp_path / "bad.yaml", tiny_assets, tmp_path / "out", max_length=20)
    assert train.run(["--config", str(cfg)]) == 2
    line = assert_one_line_error(capfd.readouterr().err, "max_length=20 leaves nothing to score",
                                 "set max_length to at least")
    suggested = int(line.split("at least ")[1].split()[0])
    assert suggested % 64 == 0 and suggested in (64, 128), line


def test_output_dir_check_lets_a_resume_or_an_overwrite_through(tiny_assets, tmp_path):
    out = _holding_a_run(tmp_path / "out")
    argv = ["--config", str(write_config(tmp_path / "c.yaml", tiny_assets, out))]
    # overwrite_output_dir or a resume lets it through the check (the resume itself is resilience.py's business)
    for extra in (["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "true"]):
        script_args, training_args, _ = train.parse(argv + extra)
        train.check_output_dir(script_args, training_args)
    script_args, training_args, _ = train.parse(argv + ["--resume_from_checkpoint", "false"])
    with pytest.raises(UserError, match="already holds a run"):
        train.check_output_dir(script_args, training_args)
    # a directory with only what an earlier failed start left (rejects) is not a run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "rejects.jsonl").write_text("")
    script_args, training_args, _ = train.parse(argv + ["--output_dir", str(fresh)])
    train.check_output_dir(script_args, training_args)


def test_no_pad_token_falls_back_to_eos_and_says_so(tiny_assets, tmp_path, capsys):
    model = save_small_model(tmp_path / "m", lambda t: setattr(t, "pad_token", None))
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out", model_name_or_path=str(model),
                       max_steps=2, eval_fraction=0.0)
    assert train.run(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "has no pad token: padding with its eos token '<|im_end|>'" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["global_step"] == 2


def test_max_length_dropping_some_pairs_warns(tiny_assets, tmp_path, capsys):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from minidpo.trainer import MiniDPOConfig

    records = [{"prompt": [{"role": "user", "content": "Tell me about the moon." + " And more." * n}],
                "chosen": [{"role": "assistant", "content": "The moon orbits the earth."}],
                "rejected": [{"role": "assistant", "content": "Go away."}]} for n in (0, 0, 0, 0, 0, 0, 0, 40, 40)]
    tok = AutoTokenizer.from_pretrained(tiny_assets / "base")
    train.check_max_length(Dataset.from_list(records), tok, MiniDPOConfig(output_dir=str(tmp_path), max_length=64, report_to="none"))
    assert "WARNING: max_length=64 leaves nothing to score in 2 of 9 pairs" in capsys.readouterr().out


def test_an_unwritable_minidpo_cache_is_one_line(tiny_assets, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MINIDPO_CACHE", str(_a_file(tmp_path) / "cache"))
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out")
    before = _files(tmp_path)
    assert train.run(["--config", str(cfg)]) == 2
    assert_one_line_error(capfd.readouterr().err, f"cannot write the prepared pairs to {tmp_path / 'a-file'}",
                          "Not a directory", "MINIDPO_CACHE")
    assert _files(tmp_path) == before


def test_an_out_of_range_eval_fraction_on_the_command_line_is_refused_at_parse_time(tiny_assets, tmp_path, capfd):
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out")
    for bad in ("-0.5", "1.5", "1"):
        assert train.run(["--config", str(cfg), "--eval_fraction", bad]) == 2
        assert_one_line_error(capfd.readouterr().err, "eval_fraction must be in [0, 1)")
    assert not (tmp_path / "out").exists()


def test_pairs_identical_after_truncation_are_warned(tiny_assets, tmp_path, capsys):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from minidpo.trainer import MiniDPOConfig

    same_start = "The same long start of an answer. " * 10
    records = [{"prompt": [{"role": "user", "content": "Tell me about the moon."}],
                "chosen": [{"role": "assistant", "content": same_start + end}],
                "rejected": [{"role": "assistant", "content": same_start + "Go away."}]}
               for end in ("The moon orbits the earth.", "It is made of rock.")]
    records.append({"prompt": records[0]["prompt"], "chosen": [{"role": "assistant", "content": "The moon."}],
                    "rejected": [{"role": "assistant", "content": "Go away."}]})
    tok = AutoTokenizer.from_pretrained(tiny_assets / "base")
    train.check_max_length(Dataset.from_list(records), tok,
                           MiniDPOConfig(output_dir=str(tmp_path), max_length=64, report_to="none"))
    assert "WARNING: 2 of 3 pairs checked are identical after truncation to max_length=64" in capsys.readouterr().out


def test_an_eval_fraction_that_holds_out_nothing_is_a_warning(tiny_assets, tmp_path, capsys):
    from transformers import AutoTokenizer

    from records_data import line, pair

    src = tmp_path / "dpo.jsonl"
    src.write_bytes(b"".join(line(pair(f"q{i}", f"good {i}", f"bad {i}")) + b"\n" for i in range(3)))
    from minidpo.loading import is_eval, load_trl_records

    records = load_trl_records(src)[0]
    seed = next(s for s in range(100) if not any(is_eval(r, 0.02, s) for r in records))
    script_args, training_args, _ = train.parse(["--dataset_name", str(src), "--output_dir", str(tmp_path / "out"),
                                                 "--eval_fraction", "0.02", "--eval_split_seed", str(seed)])
    tok = AutoTokenizer.from_pretrained(tiny_assets / "base")
    train_set, evals, _ = train.load_pairs(script_args, tok, training_args)
    assert len(train_set) == 3 and evals is None
    assert "WARNING: eval_fraction 0.02 of 3 pairs holds out none: there is no evaluation" in capsys.readouterr().out
    # a convert directory whose eval.jsonl came out empty
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "train.jsonl").write_bytes(src.read_bytes())
    (tmp_path / "conv" / "eval.jsonl").write_bytes(b"")
    script_args, training_args, _ = train.parse(["--dataset_name", str(tmp_path / "conv"), "--output_dir",
                                                 str(tmp_path / "out")])
    assert train.load_pairs(script_args, tok, training_args)[1] is None
    assert f"WARNING: {tmp_path / 'conv' / 'eval.jsonl'} holds no usable pair" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# LoRA


@pytest.fixture
def capture_trainer(monkeypatch):
    """The MiniDPOTrainer that train.main builds (main imports the class at call time, so patching works)."""
    import minidpo.trainer

    built = []

    class Capturing(minidpo.trainer.MiniDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(minidpo.trainer, "MiniDPOTrainer", Capturing)
    return built


def test_lora_trains_only_the_adapter_and_saves_adapter_and_merged(tiny_assets, tmp_path, capture_trainer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minidpo import train

    out = tmp_path / "lora"
    cfg = write_config(tmp_path / "lora.yaml", tiny_assets, out, use_peft=True, lora_r=8, lora_alpha=16,
                       lora_dropout=0.0, lora_target_modules=LORA_TARGETS, merge_adapter=True,
                       learning_rate=2.0e-2, max_steps=8)
    summary = train.main(*train.parse(["--config", str(cfg)]))
    assert summary["global_step"] == 8
    trainer = capture_trainer[0]
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, PeftModel)
    assert trainer.ref_model is None, "with LoRA the reference is the base model with adapters off, not a copy"

    # Only adapter weights are trainable and only they changed.
    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "base")
    original = base.state_dict()
    n_adapter = n_base = 0
    for name, p in model.get_base_model().named_parameters():
        if "lora_" in name:
            assert p.requires_grad, name
            n_adapter += 1
            continue
        assert not p.requires_grad, name
        key = name.replace(".base_layer.", ".")
        torch.testing.assert_close(p.detach(), original[key], rtol=0, atol=0, msg=f"base weight {key} changed")
        n_base += 1
    assert n_adapter == 2 * len(LORA_TARGETS) * base.config.num_hidden_layers and n_base > 0
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "lora_B starts at 0; training must move it"

    # Reference log-probs = the untouched base model's, length-averaged, both through TRL's reference pass and
    # inside compute_loss (rewards = beta * (policy - reference)).
    encoded = [trainer.eval_dataset[i] for i in range(4)]
    batch = trainer.data_collator(encoded)
    expected_c = [logp(base, e["chosen_input_ids"], e["chosen_loss_mask"]) for e in encoded]
    expected_r = [logp(base, e["rejected_input_ids"], e["rejected_loss_mask"]) for e in encoded]
    trainer.model.eval()
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(ref_c, torch.tensor(expected_c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_r, torch.tensor(expected_r), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    m = trainer._metrics["eval"]
    beta = trainer.args.beta
    assert m["logps/chosen"][-1] - m["rewards/chosen"][-1] / beta == pytest.approx(sum(expected_c) / 4, abs=1e-4)
    assert m["logps/rejected"][-1] - m["rewards/rejected"][-1] / beta == pytest.approx(sum(expected_r) / 4, abs=1e-4)
    assert abs(m["rewards/margins"][-1]) > 1e-4, "the adapter should have moved the policy off the reference"

    # Adapter saved (and no full weights); the merged model reloads and equals base + adapter.
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter_cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert set(adapter_cfg["target_modules"]) == set(LORA_TARGETS)
    assert (out / "README.md").is_file() and (out / "summary.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets / "base"), out)
    ids = torch.tensor([encoded[0]["chosen_input_ids"], encoded[0]["chosen_input_ids"][::-1]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        want = with_adapter(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4), "merged logits equal the base model's: nothing merged"
    assert (out / "merged" / "tokenizer.json").is_file()




def test_local_looking_paths_are_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    from trl import ModelConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/does-not-exist", "./model", "../model", "~/no-such-model", "a/b/c"):
        with pytest.raises(UserError, match="does not exist"):
            train.check_model_path(ModelConfig(model_name_or_path=name))
    train.check_model_path(ModelConfig(model_name_or_path="someone/model"))  # may be a Hub id: Transformers decides
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local folder, and HF_HUB_OFFLINE is set"):
        train.check_model_path(ModelConfig(model_name_or_path="someone/model"))


def test_reporting_integration_not_installed(tiny_assets, tmp_path, capfd):
    from transformers.integrations import get_available_reporting_integrations

    missing = next((r for r in ("tensorboard", "wandb", "mlflow") if r not in get_available_reporting_integrations()),
                   None)
    if missing is None:
        pytest.skip("every integration tried is installed")
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out", report_to=[missing])
    assert train.run(["--config", str(cfg)]) == 2
    assert_one_line_error(capfd.readouterr().err, f"report_to {missing}: not installed here")


def test_push_to_hub_without_the_hub_is_one_line(tiny_assets, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out", push_to_hub=True,
                       hub_model_id="someone/model")
    env = dict(subprocess_env(tmp_path), HF_TOKEN="hf_" + "x" * 34)  # a token, and HF_HUB_OFFLINE=1: no network
    proc = subprocess.run([sys.executable, "minidpo/train.py", "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert env["HF_TOKEN"] not in proc.stdout + proc.stderr
    assert_one_line_error(proc.stderr, "push_to_hub: the Hub cannot be reached", "OfflineModeIsEnabled")
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_resuming_with_another_model_is_one_line(tiny_assets, tmp_path, capfd):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_assets, out, max_steps=1, save_strategy="steps", save_steps=1,
                       eval_fraction=0.0)
    assert train.run(["--config", str(cfg)]) == 0
    other = save_small_model(tmp_path / "other")  # 32 wide, 1 layer; the run's model is 64 wide, 2 layers
    capfd.readouterr()
    resume = ["--config", str(cfg), "--model_name_or_path", str(other), "--resume_from_checkpoint", "true",
              "--max_steps", "2"]
    assert train.run(resume) == 2  # the run's record names the other model first
    assert_one_line_error(capfd.readouterr().err, "checkpoint-1 belongs to a run with other settings",
                          f"model {tiny_assets / 'base'} there, {other} here")
    assert train.run(resume + ["--accept_resume_changes", "true"]) == 2  # accepting it cannot make the shapes fit
    assert_one_line_error(capfd.readouterr().err, "checkpoint-1 was saved from another model",
                          "hidden_size 64 there, 32 here")


def test_training_holds_out_what_convert_holds_out(tiny_assets, tmp_path):
    """eval_fraction in training and `minidpo convert --eval-fraction` split a file the same way (same default seed),
    and the run writes the pairs it held out."""
    from minidpo.convert import convert_file
    from minidpo.loading import load_trl_records

    cfg = write_config(tmp_path / "c.yaml", tiny_assets, tmp_path / "out", max_steps=1, eval_fraction=0.2)
    assert train.run(["--config", str(cfg)]) == 0
    convert_file(tiny_assets / "dpo.jsonl", tmp_path / "conv", eval_fraction=0.2, progress=False)
    held_out = load_trl_records(tmp_path / "conv", "eval")[0]
    written = [json.loads(x) for x in (tmp_path / "out" / "eval_pairs.jsonl").read_text().splitlines()]
    assert written == held_out and 0 < len(held_out) < 160
