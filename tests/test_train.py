"""minidpo/train.py end to end on the embedded tiny model: launch, save, reload, errors, LoRA, quickstart.

Everything is built in tmp_path with minidpo.embedded; nothing is downloaded (subprocesses run with the Hub
offline switches on and a private HF_HOME, so no user-level accelerate config or cache leaks in).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_tiny_assets
from minidpo import embedded

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A base model folder (tokenizer + tiny Llama) and 160 MiniMind-format pairs with a learnable preference."""
    root = tmp_path_factory.mktemp("assets")
    return write_tiny_assets(root, pairs=160, data_seed=1)


def write_config(path: Path, assets: Path, output_dir: Path, **overrides) -> Path:
    cfg = {"model_name_or_path": str(assets / "base"), "dataset_name": str(assets / "dpo.jsonl"),
           "output_dir": str(output_dir), **TINY, **overrides}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def env(tmp_path: Path) -> dict:
    e = dict(os.environ)
    e.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def launch(cmd: list, tmp_path: Path, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=timeout)


def minidpo_cmd() -> list:
    exe = shutil.which("minidpo")
    return [exe] if exe else [sys.executable, "-m", "minidpo.cli"]


def assert_one_line_error(stderr: str, *needles: str):
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0], "the error must be the last thing printed"
    for needle in needles:
        assert needle in errors[0], errors[0]


def seq_logp(model, ids, mask):
    """Length-averaged log-prob of the scored tokens, from full-vocabulary logits (independent of TRL)."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids_t).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids_t[0, 1:, None]).squeeze(1)
    m = torch.tensor(mask[1:], dtype=logp.dtype)
    return ((logp * m).sum() / m.sum()).item()


# ---------------------------------------------------------------------------------------------------------
# Training through the launchers


def test_accelerate_launch_trains_saves_and_reloads(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "tiny.yaml", assets, out)
    proc = launch(["accelerate", "launch", "--num_processes", "1", "minidpo/train.py", "--config", str(cfg)],
                  tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "minimind format" in proc.stdout  # the dataset format is detected and said

    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "summary.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "minidpo" in card and "length_normalize" in card

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == TINY["max_steps"]
    train, final_eval = summary["final_train"], summary["final_eval"]
    # Loss goes down: it is log 2 at step 0 (policy == reference), its run average is below that and the last
    # logged value below the average.
    assert train["loss"] < train["train_loss"] < LOG2 - 0.01, train
    assert final_eval["eval_loss"] < LOG2 - 0.02, final_eval
    assert final_eval["eval_rewards/accuracies"] >= 0.9, final_eval

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(assets / "base")
    assert len(tok) == len(AutoTokenizer.from_pretrained(assets / "base"))
    assert tok.chat_template and tok.eos_token == embedded.IM_END
    trained, orig = model.state_dict(), base.state_dict()
    assert trained.keys() == orig.keys()
    assert any(not torch.equal(trained[k], orig[k]) for k in orig), "saved weights equal the base model"
    # The reloaded model prefers the chosen answer of a held-out-style pair more than the base model does.
    from minidpo.masking import encode_pair

    record = embedded.make_preference_records(1, seed=99)[0]
    pair = encode_pair({"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:],
                        "rejected": record["rejected"][-1:]}, tok, max_length=128)

    def margin(m):
        return (seq_logp(m, pair["chosen_input_ids"], pair["chosen_loss_mask"])
                - seq_logp(m, pair["rejected_input_ids"], pair["rejected_loss_mask"]))

    assert margin(model) > margin(base)


def test_python_train_py_runs_the_same_code(assets, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "tiny.yaml", assets, out)
    # Command-line values override the YAML ones.
    proc = launch([sys.executable, "minidpo/train.py", "--config", str(cfg), "--max_steps", "2",
                   "--eval_fraction", "0", "--logging_steps", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 2 and summary["final_eval"] == {}
    assert (out / "model.safetensors").is_file()


def test_minidpo_train_is_train_py(assets, tmp_path, monkeypatch):
    from minidpo import cli, train

    # argv level: `minidpo train ARGS` hands ARGS, untouched, to minidpo.train.run (the function train.py runs).
    module, add_arguments, run_name, _ = cli.COMMANDS["train"]
    assert (module, add_arguments, run_name) == ("minidpo.train", None, "run")
    seen = []
    monkeypatch.setattr(train, "run", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "--config", "x.yaml", "--beta", "0.2"]) == 0
    assert seen == [["--config", "x.yaml", "--beta", "0.2"]]
    monkeypatch.undo()

    # process level: the installed command parses the same dataclasses and fails the same clear way.
    cfg = write_config(tmp_path / "tiny.yaml", assets, tmp_path / "out", lerning_rate=1e-3)
    proc = launch(minidpo_cmd() + ["train", "--config", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_one_line_error(proc.stderr, "minidpo train: error:", "lerning_rate")


# ---------------------------------------------------------------------------------------------------------
# Clear errors: exit 2, one line, no traceback


def _small_vocab_model(assets: Path, tmp_path: Path) -> Path:
    """A model whose embedding has fewer rows than the tokenizer next to it has tokens."""
    from transformers import AutoTokenizer

    folder = tmp_path / "small-vocab"
    tok = AutoTokenizer.from_pretrained(assets / "base")
    model = embedded.build_tiny_model(tok)
    model.resize_token_embeddings(len(tok) - 512)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _neither_format(tmp_path: Path) -> Path:
    path = tmp_path / "neither.jsonl"
    path.write_text('{"question": "hi", "answer": "hello"}\n{"text": "no pairs here"}\n', encoding="utf-8")
    return path


ERROR_CASES = {
    # name: (overrides as a function of (assets, tmp_path), words the one-line message must contain)
    "unknown-config-key": (lambda a, t: {"lerning_rate": 1e-3}, ["lerning_rate"]),
    "missing-dataset": (lambda a, t: {"dataset_name": str(t / "nowhere.jsonl")}, ["nowhere.jsonl", "does not exist"]),
    "dataset-in-neither-format": (lambda a, t: {"dataset_name": str(_neither_format(t))},
                                  ["neither.jsonl", "format"]),
    "tokenizer-larger-than-embedding": (lambda a, t: {"model_name_or_path": str(_small_vocab_model(a, t))},
                                        ["1536 tokens", "1024 rows"]),
    "model-path-missing": (lambda a, t: {"model_name_or_path": str(t / "no-such-model")}, ["no-such-model"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_clear_errors(case, assets, tmp_path, capfd):
    from minidpo import train

    overrides, needles = ERROR_CASES[case]
    cfg = write_config(tmp_path / "bad.yaml", assets, tmp_path / "out", **overrides(assets, tmp_path))
    capfd.readouterr()
    assert train.run(["--config", str(cfg)]) == 2
    stderr = capfd.readouterr().err
    assert_one_line_error(stderr, "minidpo train: error:", *needles)


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


def test_lora_trains_only_the_adapter_and_saves_adapter_and_merged(assets, tmp_path, capture_trainer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minidpo import train

    out = tmp_path / "lora"
    cfg = write_config(tmp_path / "lora.yaml", assets, out, use_peft=True, lora_r=8, lora_alpha=16,
                       lora_dropout=0.0, lora_target_modules=LORA_TARGETS, merge_adapter=True,
                       learning_rate=2.0e-2, max_steps=8)
    summary = train.main(*train.parse(["--config", str(cfg)]))
    assert summary["global_step"] == 8
    trainer = capture_trainer[0]
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, PeftModel)
    assert trainer.ref_model is None, "with LoRA the reference is the base model with adapters off, not a copy"

    # Only adapter weights are trainable and only they changed.
    base = AutoModelForCausalLM.from_pretrained(assets / "base")
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
    expected_c = [seq_logp(base, e["chosen_input_ids"], e["chosen_loss_mask"]) for e in encoded]
    expected_r = [seq_logp(base, e["rejected_input_ids"], e["rejected_loss_mask"]) for e in encoded]
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
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "base"), out)
    ids = torch.tensor([encoded[0]["chosen_input_ids"], encoded[0]["chosen_input_ids"][::-1]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        want = with_adapter(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4), "merged logits equal the base model's: nothing merged"
    assert (out / "merged" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# The embedded default


@pytest.mark.slow
def test_quickstart_reaches_accuracy_and_writes_what_it_promises(tmp_path, monkeypatch):
    from minidpo.quickstart import quickstart

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "qs"
    result = quickstart(output=str(out))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["eval_rewards/accuracies"] >= 0.9, summary
    assert summary["eval_pairs"] > 0 and summary["paths"] == result["paths"]
    for name, path in summary["paths"].items():
        assert Path(path).exists(), f"{name}: {path} promised but missing"
    model = out / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "summary.json"):
        assert (model / name).is_file(), name
    assert (out / "data" / "train.jsonl").is_file() and (out / "data" / "eval.jsonl").is_file()
