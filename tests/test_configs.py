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


MINIMIND_CONFIGS = ["minimind2-small.yaml", "minimind2.yaml", "minimind2-small-lora.yaml", "minimind3.yaml"]


@pytest.mark.parametrize("name", MINIMIND_CONFIGS)
def test_minimind_configs_are_minimind_runs(name, tmp_path):
    """MiniMind's train_dpo.py defaults of the version each file names, and its loop's options all on."""
    script_args, args, model_args = parse(REPO / "configs" / name, tmp_path)
    minimind3 = name == "minimind3.yaml"
    assert args.length_normalize is not minimind3 and args.beta == (0.15 if minimind3 else 0.1)
    assert args.mask_mode == "minimind" and args.loss_type == ["sigmoid"] and args.max_length == 1024
    assert args.num_train_epochs == 1 and args.per_device_train_batch_size == 4
    assert args.gradient_accumulation_steps == 1 and args.max_grad_norm == 1.0 and args.weight_decay == 0.01
    assert args.minimind_lr_schedule == "cosine-1.0-to-0.1" and args.minimind_data_order and args.decay_all_parameters
    # minimind-3's DPODataset: post_processing_chat(empty_think_ratio=0.2), --num_workers 8
    assert (args.empty_think_keep_ratio, args.minimind_num_workers) == ((0.2, 8) if minimind3 else (1.0, 0))
    # bf16 is left to the hardware default: not in the file, so parsing gives what MiniDPOConfig picks alone
    assert "bf16" not in yaml.safe_load((REPO / "configs" / name).read_text(encoding="utf-8"))
    assert args.bf16 == MiniDPOConfig(output_dir=str(tmp_path), report_to="none").bf16
    if "lora" in name:
        assert model_args.use_peft and set(model_args.lora_target_modules) == LORA_TARGETS
        assert 8 <= model_args.lora_r <= 16 and script_args.merge_adapter
        assert args.learning_rate > 1e-7, "LoRA needs a higher learning rate than MiniMind's full DPO"
    else:
        assert not model_args.use_peft
        assert args.learning_rate == 4e-8, "MiniMind's --learning_rate default"


def _trainer(tmp_path, **config):
    from datasets import Dataset

    from records_data import to_trl
    from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
    from minidpo.trainer import MiniDPOTrainer

    tok = build_tokenizer()
    data = [to_trl(r) for r in make_preference_records(10, seed=1)]
    return MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok),
                          args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none", **config),
                          train_dataset=Dataset.from_list(data), processing_class=tok)


@pytest.mark.parametrize("schedule,accumulation", [("2510", 1), ("2512", 1), ("2512", 3)])
def test_minimind_lr_schedule_is_get_lr_stepped_from_1(tmp_path, schedule, accumulation):
    """MiniMind sets lr = get_lr(epoch * iters + step, epochs * iters, lr) before each batch, step counted from 1;
    an optimizer step takes the lr of its last batch."""
    lr, steps = 3e-4, 40
    trainer = _trainer(tmp_path, learning_rate=lr, minimind_lr_schedule=schedule,
                       gradient_accumulation_steps=accumulation)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    total = steps * accumulation
    for k in range(steps):
        batch = (k + 1) * accumulation
        if schedule == "2510":
            expected = lr / 10 + 0.5 * lr * (1 + math.cos(math.pi * batch / total))
        else:
            expected = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * batch / total)))
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), k
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


def test_minimind_data_order_and_weight_decay(tmp_path):
    import torch

    trainer = _trainer(tmp_path, minimind_data_order=True, decay_all_parameters=True, weight_decay=0.01)
    sampler = trainer._get_train_sampler()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        torch.manual_seed(42 + epoch)
        assert list(sampler) == torch.randperm(10).tolist(), epoch
    trainer.create_optimizer()
    decayed = [p for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.01 for p in g["params"]]
    assert len(decayed) == len(list(trainer.model.parameters()))  # norms included, as MiniMind's AdamW
    plain = _trainer(tmp_path, weight_decay=0.01)
    plain.create_optimizer()
    assert any(g["weight_decay"] == 0.0 and g["params"] for g in plain.optimizer.param_groups)  # Transformers' rule


# ---------------------------------------------------------------------------------------------------------
# Accelerate configs: every file loads with Accelerate's own config loading and passes `accelerate launch`'s
# validation; no GPU here, so the GPU ones are parsed and validated, not run.

EXPECTED = {
    "cpu_ddp.yaml": "MULTI_GPU",  # the torchrun launcher; the processes run MULTI_CPU (see the file)
    "single_gpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED", "fsdp2.yaml": "FSDP",
    "multi_node.yaml": "MULTI_GPU",
    "cpu_fsdp2.yaml": "FSDP",  # the torchrun launcher; MiniDPOTrainer makes Accelerate shard on CPU (see the file)
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
    elif name in ("fsdp2.yaml", "cpu_fsdp2.yaml"):
        assert args.use_fsdp
        assert int(cfg.fsdp_config["fsdp_version"]) == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        if name == "cpu_fsdp2.yaml":
            assert cfg.use_cpu and cfg.num_processes == 2 and cfg.mixed_precision == "no"
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
