"""Every shipped training config parses with train.py's own parser, and the MiniMind ones say what MiniMind does."""

import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# configs/accelerate/ holds `accelerate launch --config_file` files, not training configs.
TRAIN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.y*ml") if "accelerate" not in p.relative_to(REPO).parts)
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def parse(path: Path, tmp_path: Path):
    from minidpo.train import parse as train_parse

    return train_parse(["--config", str(path), "--output_dir", str(tmp_path / "out")])


def test_configs_exist():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"quickstart.yaml", "minimind2-small.yaml", "minimind2.yaml", "minimind2-small-lora.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_every_config_parses(path, tmp_path):
    script_args, training_args, model_args = parse(path, tmp_path)
    assert training_args.output_dir == str(tmp_path / "out")  # the command line wins over the file
    assert model_args.model_name_or_path and script_args.dataset_name


@pytest.mark.parametrize("name", ["minimind2-small.yaml", "minimind2.yaml", "minimind2-small-lora.yaml"])
def test_minimind_configs_use_minimind_dpo(name, tmp_path):
    script_args, args, model_args = parse(REPO / "configs" / name, tmp_path)
    assert args.length_normalize and args.mask_mode == "minimind" and args.loss_type == ["sigmoid"]
    assert args.beta == 0.1 and args.max_length == 1024
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 1
    assert args.max_grad_norm == 1.0 and args.weight_decay == 0.01
    assert args.bf16 == hardware_bf16(), "bf16 is left to the hardware default"
    if "lora" in name:
        assert model_args.use_peft and set(model_args.lora_target_modules) == LORA_TARGETS
        assert 8 <= model_args.lora_r <= 16 and script_args.merge_adapter
        assert args.learning_rate > 1e-7, "LoRA needs a higher learning rate than MiniMind's full DPO"
    else:
        assert not model_args.use_peft
        assert args.learning_rate <= 5e-8, "MiniMind keeps full-DPO learning rates <= 5e-8"


def hardware_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@pytest.mark.parametrize("name,base_lr", [("minimind2-small.yaml", 1e-8), ("minimind2.yaml", 1e-8),
                                          ("minimind2-small-lora.yaml", 5e-6)])
def test_schedule_is_minimind_get_lr(name, base_lr, tmp_path):
    """MiniMind2's get_lr(step, total, lr) = lr/10 + lr/2 * (1 + cos(pi * step / total)), step by step."""
    import torch
    from transformers import get_scheduler

    _, args, _ = parse(REPO / "configs" / name, tmp_path)
    total = 50
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.warmup_steps,
                          num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    for step in range(total):
        minimind = base_lr / 10 + 0.5 * base_lr * (1 + math.cos(math.pi * step / total))
        assert sched.get_last_lr()[0] == pytest.approx(minimind, rel=1e-9), f"step {step}"
        opt.step()
        sched.step()
