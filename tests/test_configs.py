"""configs/: every training config parses with train.py's own parser and the MiniMind ones say what MiniMind does;
every Accelerate config passes `accelerate launch`'s own validation."""

import math
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TRAIN_PY
from minidpo.trainer import MiniDPOConfig

ACCEL = REPO / "configs" / "accelerate"
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
    # bf16 is left to the hardware default: not in the file, so parsing gives what MiniDPOConfig picks alone
    assert "bf16" not in yaml.safe_load((REPO / "configs" / name).read_text(encoding="utf-8"))
    assert args.bf16 == MiniDPOConfig(output_dir=str(tmp_path), report_to="none").bf16
    if "lora" in name:
        assert model_args.use_peft and set(model_args.lora_target_modules) == LORA_TARGETS
        assert 8 <= model_args.lora_r <= 16 and script_args.merge_adapter
        assert args.learning_rate > 1e-7, "LoRA needs a higher learning rate than MiniMind's full DPO"
    else:
        assert not model_args.use_peft
        assert args.learning_rate <= 5e-8, "MiniMind keeps full-DPO learning rates <= 5e-8"


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


# ---------------------------------------------------------------------------------------------------------
# Accelerate configs: every file loads with Accelerate's own config loading and passes `accelerate launch`'s
# validation; no GPU here, so the GPU ones are parsed and validated, not run.

EXPECTED = {
    "cpu_ddp.yaml": "MULTI_GPU",  # the torchrun launcher; the processes run MULTI_CPU (see the file)
    "single_gpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED", "fsdp2.yaml": "FSDP",
    "multi_node.yaml": "MULTI_GPU",
}


def test_every_expected_config_exists():
    assert sorted(p.name for p in ACCEL.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads_and_validates(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ACCEL / name
    cfg = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == EXPECTED[name]

    # What `accelerate launch --config_file X minidpo/train.py --config ...` does before starting processes.
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), str(TRAIN_PY), "--config", "configs/quickstart.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.training_script == str(TRAIN_PY) and args.training_script_args[:1] == ["--config"]
    assert args.num_processes == cfg.num_processes >= 1
    # Nested keys are copied onto launch arguments without any check by Accelerate: make sure each is one.
    known = vars(parser.parse_args([str(TRAIN_PY)]))
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in (getattr(cfg, section) or {}):
            name_ = key if key.startswith(prefix) else prefix + key
            assert name_ in known, f"{name}: {section}.{key} is not an `accelerate launch` option"

    if name == "cpu_ddp.yaml":
        # MULTI_CPU would make `accelerate launch` start a single process (no MPI here): torchrun must start 2.
        assert cfg.use_cpu and args.multi_gpu and cfg.num_processes == 2
    elif name.startswith("deepspeed"):
        stage = int(cfg.deepspeed_config["zero_stage"])
        assert args.use_deepspeed and stage == int(name[-6])
        # Left out so DeepSpeed takes them from the training config ("auto") and cannot disagree with it.
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config
        if stage == 3:
            assert cfg.deepspeed_config["zero3_init_flag"] is True
            assert cfg.deepspeed_config["zero3_save_16bit_model"] is True
    elif name == "fsdp2.yaml":
        assert args.use_fsdp
        assert int(cfg.fsdp_config["fsdp_version"]) == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    elif name == "multi_node.yaml":
        assert cfg.num_machines > 1 and cfg.main_process_ip and cfg.main_process_port
        text = path.read_text()
        for field in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
            line = next(l for l in text.splitlines() if l.startswith(field + ":"))
            assert "FILL IN" in line, f"{field} is not marked for the user to fill in"
    elif name in ("multi_gpu.yaml",):
        assert args.multi_gpu and not cfg.use_cpu


def test_fsdp2_config_builds_accelerates_plugin(monkeypatch):
    """Beyond parsing: the environment `accelerate launch` sets from fsdp2.yaml builds a valid FSDP2 plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / "fsdp2.yaml"), str(TRAIN_PY)])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    for k, v in env.items():
        if k.startswith("FSDP_") or k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
