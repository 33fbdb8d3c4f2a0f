"""What only a CUDA machine can check (marked `gpu`, skipped elsewhere; scripts/gpu_check.sh runs them): bf16
autocast in training, TRL's Triton fused LM head under packed pair rows, and training under FSDP2 and DeepSpeed
ZeRO-2/3 on one GPU, with the reference precomputed.

Only torch and pytest are imported at module level: on the GPU machine trl, datasets and deepspeed come from carried
wheels, and a missing one must fail (or skip) its own tests with its name, not stop the collection of the file.
`MINIDPO_GPU_TESTS_ON_CPU=1` runs the two tests that mean something on a CPU too (there the LM head is minidpo's
compact head and autocast is CPU autocast): scripts/gpu_simulate.sh uses it to run them in the device-like
environment.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, SUBPROCESS_TIMEOUT, subprocess_env, write_tiny_assets
from records_data import to_trl
from references import perturbed_policy

ON_CPU = os.environ.get("MINIDPO_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                                                  reason="needs a CUDA device")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# bf16 against fp32, |train loss difference| per logged step. bf16 keeps 8 significant bits, so every matmul under
# autocast (linear layers, attention, the LM head) rounds its inputs to a relative 2^-9, and the per-token log-probs
# inherit errors of about that relative size (their mean here is about -7: ~1.4e-2), partly averaged out over the
# scored tokens of a sequence. The loss -logsigmoid(beta * m) moves by at most beta * |dm|, and the margin m combines
# four mean log-probs (policy and reference, chosen and rejected): |dloss| <= 4 * beta * |d mean log-prob|, with
# BF16_BETA = 1 a few 1e-2 in the worst case where the four errors add up. Measured under CPU autocast (the same
# matmuls rounded): 7.5e-4 to 2.8e-3 over the three steps (torch 2.13 and 2.11, either way of scoring the
# reference). The bound, 2e-2, sits between that and the worst case, and is a fifth of the distance from log 2 the
# test asks of the loss (the policy is far from the reference), so a bf16 run that learned something else than the
# fp32 run is seen; which models ran in bf16 is checked directly.
BF16_BETA = 1.0
BF16_LOSS_BOUND = 2e-2


def _trainer(tmp_path, steps=0, hook=None, **config):
    """`hook(role, model)` sees the policy and the reference before the trainer does (a precompute runs in its
    __init__)."""
    from datasets import Dataset

    from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
    from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer

    tok = build_tokenizer()
    policy, ref = perturbed_policy(tok), build_tiny_model(tok)
    if hook:
        hook("policy", policy)
        hook("reference", ref)
    data = [to_trl(r) for r in make_preference_records(8, seed=5, multi_turn_fraction=0.5)]
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8, max_length=512,
                         max_steps=max(steps, 1), logging_steps=1, save_strategy="no", learning_rate=1e-3,
                         lr_scheduler_type="constant", disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / "rc"),
                         **config)
    return MiniDPOTrainer(policy, ref_model=ref, args=args,
                          train_dataset=Dataset.from_list(data), processing_class=tok)


def _loss_and_grads(tmp_path, **config):
    trainer = _trainer(tmp_path, beta=5.0, **config)
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


def _train(tmp_path, bf16: bool, precompute: bool):
    """Three optimizer steps through trainer.train(), as a run trains: Accelerate wraps the policy's forward in
    autocast, TRL runs the reference (per step, or once in the precompute) under accelerator.autocast(). Returns the
    logged losses and the dtypes the first attention projection of each model produced."""
    seen = {"policy": set(), "reference": set()}

    def hook(role, model):
        proj = model.model.layers[0].self_attn.q_proj
        proj.register_forward_hook(lambda _m, _i, out: seen[role].add(out.dtype))

    trainer = _trainer(tmp_path, steps=3, hook=hook, beta=BF16_BETA, bf16=bf16, precompute_ref_log_probs=precompute)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], seen


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-each-step", "reference-precomputed"])
def test_bf16_training_runs_both_models_under_autocast_close_to_fp32(tmp_path, precompute):
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if torch.cuda.is_available():
        from minidpo.trainer import MiniDPOConfig

        assert MiniDPOConfig(output_dir=str(tmp_path), report_to="none").bf16  # the default where the GPU has it
    losses, seen = _train(tmp_path / "bf16", bf16=True, precompute=precompute)
    ref_losses, ref_seen = _train(tmp_path / "fp32", bf16=False, precompute=precompute)
    assert seen == {"policy": {torch.bfloat16}, "reference": {torch.bfloat16}}, seen
    assert ref_seen == {"policy": {torch.float32}, "reference": {torch.float32}}, ref_seen
    assert len(losses) == len(ref_losses) == 3 and all(map(math.isfinite, losses))
    assert abs(ref_losses[0] - math.log(2)) > 5 * BF16_LOSS_BOUND  # the policy is far from the reference
    diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
    print(f"bf16 - fp32 train loss per step, reference {'precomputed' if precompute else 'each step'}: "
          f"{', '.join(f'{d:.1e}' for d in diffs)} (bound {BF16_LOSS_BOUND:.0e})")
    assert max(diffs) < BF16_LOSS_BOUND, (losses, ref_losses)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("gpu"), pairs=32, data_seed=0)


def _launch(assets, tmp_path, name, accelerate_config):
    import yaml

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


@pytest.fixture(scope="module")
def plain_run(assets, tmp_path_factory):
    """The plain single-GPU run the sharded ones are compared with, launched once for all of them."""
    return _launch(assets, tmp_path_factory.mktemp("plain"), "plain", "single_gpu.yaml")


@needs_cuda
@pytest.mark.parametrize("engine", ["fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_engines_on_one_gpu_train_as_plain(assets, plain_run, tmp_path, engine):
    """FSDP2 and ZeRO-2/3 (one process) with the reference precomputed: the same losses as a plain single-GPU run."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    sharded = _launch(assets, tmp_path, "sharded", engine)
    assert sharded["global_step"] == plain_run["global_step"] == 4
    assert abs(sharded["final_train"]["train_loss"] - plain_run["final_train"]["train_loss"]) < 1e-4
