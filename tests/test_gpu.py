"""What only a CUDA machine can check (marked `gpu`, skipped elsewhere; scripts/gpu_check.sh runs them): bf16
autocast, TRL's Triton fused LM head under packed pair rows, and training under FSDP2 and DeepSpeed ZeRO-2/3 on one
GPU, with the reference precomputed."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from datasets import Dataset

from helpers import REPO, SUBPROCESS_TIMEOUT, perturbed_policy, subprocess_env, to_trl, write_tiny_assets
from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _loss_and_grads(tmp_path, **config):
    tok = build_tokenizer()
    data = [to_trl(r) for r in make_preference_records(8, seed=5, multi_turn_fraction=0.5)]
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8, beta=5.0,
                         max_length=512, **config)
    trainer = MiniDPOTrainer(perturbed_policy(tok), ref_model=build_tiny_model(tok), args=args,
                             train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    trainer.model.train()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in trainer.model.named_parameters()}


def test_triton_fused_head_with_packed_pairs_keeps_loss_and_gradients(tmp_path):
    """On CUDA the LM head is TRL's Triton kernel (not minidpo's compact head): packing pairs must not change it."""
    loss, grads = _loss_and_grads(tmp_path / "a", share_prompt=True, bf16=False)
    ref_loss, ref_grads = _loss_and_grads(tmp_path / "b", share_prompt=False, bf16=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4 * g.abs().max().item(), msg=name)


def test_bf16_autocast_stays_close_to_fp32(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert MiniDPOConfig(output_dir=str(tmp_path), report_to="none").bf16  # the default where the GPU has it
    loss, _ = _loss_and_grads(tmp_path / "a", bf16=True)
    ref, _ = _loss_and_grads(tmp_path / "b", bf16=False)
    assert abs(loss.item() - ref.item()) < 5e-3 and abs(ref.item() - 0.6931) > 0.1


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("gpu"), pairs=32, data_seed=0)


def _launch(assets, tmp_path, name, accelerate_config):
    cfg = {"model_name_or_path": str(assets / "base"), "dataset_name": str(assets / "dpo.jsonl"),
           "output_dir": str(tmp_path / name), "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 128,
           "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0,
           "precompute_ref_log_probs": True, "ref_cache_dir": str(tmp_path / f"cache-{name}"), "bf16": False}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / accelerate_config), "--num_processes", "1", "--mixed_precision", "no",
           "minidpo/train.py", "--config", str(tmp_path / f"{name}.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.mark.parametrize("engine", ["fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_engines_on_one_gpu_train_as_plain(assets, tmp_path, engine):
    """FSDP2 and ZeRO-2/3 (one process) with the reference precomputed: the same losses as a plain single-GPU run."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    plain = _launch(assets, tmp_path, "plain", "single_gpu.yaml")
    sharded = _launch(assets, tmp_path, "sharded", engine)
    assert sharded["global_step"] == plain["global_step"] == 4
    assert abs(sharded["final_train"]["train_loss"] - plain["final_train"]["train_loss"]) < 1e-4
