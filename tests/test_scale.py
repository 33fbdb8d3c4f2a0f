"""Scaling out and surviving faults, end to end: DDP == one process, exact resume after SIGKILL, preemption by
SIGTERM, determinism, reference log-probs precomputed once across processes, FSDP2 sharded on CPU == one process.

Everything runs on CPU with the embedded tiny Llama. The multi-process tests launch `accelerate launch
--config_file configs/accelerate/cpu_ddp.yaml` (2 processes, gloo), or cpu_fsdp2.yaml, or the DeepSpeed files.
The precompute test's worker script (what `accelerate launch` runs in each process) is tests/scale_worker.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, SUBPROCESS_TIMEOUT, TRAIN_PY, subprocess_env, write_tiny_assets

ACCEL = REPO / "configs" / "accelerate"
WORKER = Path(__file__).with_name("scale_worker.py")
N_PAIRS = 48

# Mirrors the quickstart's scoring; small and fast. cosine + warmup so resume must restore the scheduler too.
BASE_CONFIG = {
    "length_normalize": True,
    "mask_mode": "minimind",
    "loss_type": ["sigmoid"],
    "beta": 0.1,
    "max_length": 128,
    "learning_rate": 2.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "max_steps": 8,
    "per_device_train_batch_size": 4,
    "seed": 7,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 2,
    "report_to": "none",
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
    # No use_cpu: on a machine without an accelerator MiniDPOConfig sets it, so cpu_ddp.yaml needs no extra flag.
}


def _env():
    return subprocess_env(threads=1)  # one thread per process, as train_in_process runs: results compare bitwise


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model folder (tokenizer included) and a MiniMind dpo.jsonl of N_PAIRS pairs."""
    root = tmp_path_factory.mktemp("scale")
    write_tiny_assets(root, pairs=N_PAIRS, data_seed=0, model_dir="model")
    return root


def write_config(path: Path, assets: Path, output_dir: Path, **overrides) -> Path:
    import yaml

    cfg = {**BASE_CONFIG, "model_name_or_path": str(assets / "model"), "dataset_name": str(assets / "dpo.jsonl"),
           "output_dir": str(output_dir), **overrides}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_in_process(config: Path, *extra: str) -> dict:
    """train.py's main in this process, on one thread (as the subprocesses run) so results compare bitwise."""
    import torch

    from minidpo import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(*train.parse(["--config", str(config), *extra]))
    finally:
        torch.set_num_threads(threads)


def launch_cmd(*args: str, config_file: str | None = None) -> list[str]:
    """`accelerate launch` with a config of configs/accelerate (launch options first among `args`, then the script)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(ACCEL / config_file)]
    else:
        cmd += ["--num_processes", "1", "--cpu"]
    return cmd + list(args)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def bitwise_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def step_losses(checkpoint: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history(checkpoint) if "loss" in e}


def assert_matches_reference(run: Path, reference: dict, what: str, saved: dict | None = None) -> dict[int, float]:
    """`run` logged a loss for each of the reference's 8 steps and ended at its weights (`saved`, else the folder's),
    both within 1e-5; prints the measured gaps; returns the run's losses."""
    losses = step_losses(run / "checkpoint-8")
    assert sorted(losses) == sorted(reference["losses"]) == list(range(1, 9))
    loss_diff = max(abs(losses[s] - reference["losses"][s]) for s in reference["losses"])
    weight_diff = max_abs_diff(weights(run) if saved is None else saved, reference["weights"])
    print(f"\n{what} vs 1 process: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    return losses


# -------------------------------------------------------------------------------------------------------------
# Shared reference: one uninterrupted single-process run (8 steps, checkpoints every 2), batches recorded.


def _record_batches(monkeypatch):
    """Record a digest of every training batch (ids + masks) in the order the model sees them."""
    from minidpo.trainer import MiniDPOTrainer

    seen = []
    original = MiniDPOTrainer.training_step

    def training_step(self, model, inputs, *a, **k):
        h = hashlib.sha1()
        for key in ("input_ids", "completion_mask"):
            h.update(inputs[key].cpu().numpy().tobytes())
        seen.append(h.hexdigest()[:12])
        return original(self, model, inputs, *a, **k)

    monkeypatch.setattr(MiniDPOTrainer, "training_step", training_step)
    return seen


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        batches = _record_batches(mp)
        out = tmp_path_factory.mktemp("reference")
        train_in_process(write_config(out / "config.yaml", assets, out / "run"))
    finally:
        mp.undo()
    return {"dir": out / "run", "weights": weights(out / "run"), "batches": list(batches),
            "losses": step_losses(out / "run" / "checkpoint-8")}


# -------------------------------------------------------------------------------------------------------------
# 5. Determinism


def test_same_seed_same_weights_different_seed_different_order(assets, reference, tmp_path, monkeypatch):
    batches = _record_batches(monkeypatch)
    train_in_process(write_config(tmp_path / "same.yaml", assets, tmp_path / "same", save_strategy="no"))
    assert batches == reference["batches"] and len(set(batches)) == 8
    assert bitwise_equal(weights(tmp_path / "same"), reference["weights"])

    batches.clear()
    train_in_process(write_config(tmp_path / "other.yaml", assets, tmp_path / "other", seed=8, max_steps=2,
                                  save_strategy="no"))
    assert batches[:2] != reference["batches"][:2], "a different seed must shuffle the data differently"


# -------------------------------------------------------------------------------------------------------------
# 2. DDP (2 CPU processes x per-device 2) == 1 process x per-device 4, same global batch of 4


@pytest.mark.slow
def test_cpu_ddp_matches_single_process(assets, reference, tmp_path):
    # The reference run is 1 process x 4 pairs. Accelerate splits the sampler's batches over the ranks in order
    # (rank r takes batch r, r+2, ...), so global step k sees the same 4 pairs: 2 on each rank.
    config = write_config(tmp_path / "ddp.yaml", assets, tmp_path / "ddp", per_device_train_batch_size=2,
                          save_steps=8)
    t = time.time()
    proc = subprocess.run(launch_cmd(str(TRAIN_PY), "--config", str(config), config_file="cpu_ddp.yaml"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # one copy of each [minidpo] line, whatever the number of processes
    assert proc.stdout.count("[minidpo] dataset ") == 1 and proc.stdout.count("[minidpo] tokenizer ") == 1, proc.stdout
    assert "find_unused_parameters" not in proc.stderr, "DDP was asked to look for unused parameters"
    ddp_losses = assert_matches_reference(tmp_path / "ddp", reference, f"DDP ({time.time() - t:.0f} s)")
    assert ddp_losses[1] != ddp_losses[8]  # it trained


@pytest.mark.slow
def test_two_machines_simulated_on_one_match_single_process(assets, reference, tmp_path):
    """What multi_node.yaml describes, on one host: two `accelerate launch` invocations, --machine_rank 0 and 1,
    --num_machines 2, main_process_ip 127.0.0.1, one process each; together they train as 1 process x 4 pairs."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "nodes.yaml", assets, tmp_path / "nodes", per_device_train_batch_size=2,
                          save_steps=8)
    machines = [subprocess.Popen(launch_cmd("--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                                            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                                            str(TRAIN_PY), "--config", str(config), config_file="cpu_ddp.yaml"),
                                 cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for rank in (0, 1)]
    outputs = [m.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert outputs[0].count("[minidpo] dataset ") == 1 and "[minidpo] dataset " not in outputs[1]  # global rank 0
    assert_matches_reference(tmp_path / "nodes", reference, "2 machines x 1 process")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_on_two_cpu_processes_matches_single_process(assets, reference, tmp_path, engine):
    """DeepSpeed ZeRO-2 and ZeRO-3 run on CPU (gloo) with these versions: 2 processes x 2 pairs train as 1 x 4."""
    pytest.importorskip("deepspeed")
    import torch

    config = write_config(tmp_path / "ds.yaml", assets, tmp_path / "ds", per_device_train_batch_size=2,
                          save_steps=8)
    proc = subprocess.run(launch_cmd("--num_processes", "2", "--mixed_precision", "no", str(TRAIN_PY), "--config",
                                     str(config), config_file=engine),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    saved = weights(tmp_path / "ds")
    # ZeRO-2's save keeps the tied LM head under its own name too (the same tensor as the embedding)
    if "lm_head.weight" in saved and "lm_head.weight" not in reference["weights"]:
        assert torch.equal(saved.pop("lm_head.weight"), saved["model.embed_tokens.weight"])
    assert_matches_reference(tmp_path / "ds", reference, f"{engine} on 2 CPU processes", saved=saved)


# -------------------------------------------------------------------------------------------------------------
# 6. Precomputed reference log-probs: each rank scores its shard once, results gathered, identical everywhere


@pytest.fixture(scope="module")
def precomputed(assets, tmp_path_factory):
    """The worker once under cpu_ddp.yaml (2 processes) and once as a single process."""
    tmp = tmp_path_factory.mktemp("precompute")
    dumps = {}
    for label, world in (("ddp", 2), ("one", 1)):
        config = write_config(tmp / f"{label}.yaml", assets, tmp / label, precompute_ref_log_probs=True,
                              precompute_ref_batch_size=4)
        args = [str(WORKER), "precompute", str(config), str(tmp / label)]
        cmd = launch_cmd(*args, config_file="cpu_ddp.yaml") if world == 2 else [sys.executable, *args]
        # A fresh minidpo ref-logp cache (MiniDPOTrainer keeps one across runs): every pair must really be scored.
        env = dict(_env(), MINIDPO_CACHE=str(tmp / "ref-cache"))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, f"{label}:\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
        dumps[label] = [json.loads((tmp / f"{label}.{r}.json").read_text()) for r in range(world)]
    return dumps


def _check_precompute(dumps, kind):
    ranks = [d[kind] for d in dumps["ddp"]]
    single = dumps["one"][0]["disk"]
    for r in ranks:
        assert "error" not in r, r["error"]
    assert single["world"] == 1 and all(r["world"] == 2 for r in ranks)
    # No duplicate work: the two ranks together scored every pair once (N_PAIRS splits evenly: no padding).
    assert single["scored_pairs"] == N_PAIRS
    assert [r["scored_pairs"] for r in ranks] == [N_PAIRS // 2, N_PAIRS // 2]
    # No mismatch: both ranks hold the same gathered columns, in dataset order, equal to one process's.
    assert ranks[0]["ids"] == ranks[1]["ids"] == single["ids"]
    assert ranks[0]["chosen"] == ranks[1]["chosen"] and ranks[0]["rejected"] == ranks[1]["rejected"]
    diff = max(abs(a - b) for key in ("chosen", "rejected") for a, b in zip(ranks[0][key], single[key]))
    print(f"\nprecomputed ref log-probs ({kind} dataset), 2 ranks vs 1 process: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.slow
def test_precomputed_ref_logps_once_across_processes(precomputed):
    _check_precompute(precomputed, "disk")


@pytest.mark.slow
def test_precomputed_ref_logps_in_memory_dataset_across_processes(precomputed):
    _check_precompute(precomputed, "memory")


# -------------------------------------------------------------------------------------------------------------
# 3. Exact resume after SIGKILL; 4. preemption by SIGTERM


class _Proc:
    """A training subprocess whose output is read as it comes."""

    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, predicate, timeout=SUBPROCESS_TIMEOUT, what="condition"):
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return
            if self.p.poll() is not None:
                raise AssertionError(f"process ended (rc {self.p.returncode}) before {what}:\n{self.output[-4000:]}")
            time.sleep(0.02)
        self.p.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.output[-4000:]}")

    def finish(self, timeout=SUBPROCESS_TIMEOUT):
        rc = self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise(assets, reference, tmp_path, capfd):
    from minidpo.resilience import checkpoint_problem

    config = write_config(tmp_path / "c.yaml", assets, tmp_path / "run")
    run = _Proc([sys.executable, str(TRAIN_PY), "--config", str(config)])
    first = tmp_path / "run" / "checkpoint-2"
    run.wait_for(lambda: checkpoint_problem(first) is None, what="checkpoint-2")
    os.killpg(run.p.pid, signal.SIGKILL)  # no chance to clean up, like an OOM kill or a lost node
    assert run.finish() == -signal.SIGKILL
    assert not (tmp_path / "run" / "model.safetensors").exists(), "the run finished before the kill"
    done = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert "checkpoint-8" not in done

    capfd.readouterr()
    train_in_process(config, "--resume_from_checkpoint", "true")
    resumed = capfd.readouterr()
    assert "taking over" in resumed.out  # the killed run's lock
    assert "missing keys" not in resumed.err, "the tied LM head reported as missing"
    assert step_losses(tmp_path / "run" / "checkpoint-8") == reference["losses"]
    assert bitwise_equal(weights(tmp_path / "run"), reference["weights"]), \
        f"max |diff| {max_abs_diff(weights(tmp_path / 'run'), reference['weights']):.2e}"


@pytest.mark.slow
def test_sigterm_saves_checkpoint_exits_0_and_resumes(assets, reference, tmp_path):
    from minidpo.resilience import checkpoint_problem, latest_checkpoint

    # Checkpoints only from the preemption: save_steps beyond max_steps.
    config = write_config(tmp_path / "c.yaml", assets, tmp_path / "run", save_steps=100)
    run = _Proc([sys.executable, str(TRAIN_PY), "--config", str(config)])
    run.wait_for(lambda: "'loss'" in run.output, what="the first logged step")
    os.kill(run.p.pid, signal.SIGTERM)
    assert run.finish() == 0, run.output[-4000:]
    out = run.output
    assert "SIGTERM received" in out and "--resume_from_checkpoint true" in out, out[-3000:]
    ckpt, _ = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and checkpoint_problem(ckpt) is None
    step = int(ckpt.rsplit("-", 1)[1])
    assert 1 <= step < 8, step
    assert f"checkpoint saved to {ckpt}" in out
    # Not finished, so not written as if it were: no final model, no summary.
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "summary.json").exists()

    summary = train_in_process(config, "--resume_from_checkpoint", "true")
    assert summary["global_step"] == 8
    assert bitwise_equal(weights(tmp_path / "run"), reference["weights"])


# -------------------------------------------------------------------------------------------------------------
# 7. FSDP2 on 2 CPU processes (cpu_fsdp2.yaml): really sharded, trains as 1 process, saves, resumes, LoRA too

FSDP2_SHARDED = re.compile(r"\[minidpo\] FSDP2: (\d+) of (\d+) parameter tensors sharded over 2 processes")
LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"]}


def _launch_fsdp2(config: Path, *train_args: str) -> subprocess.CompletedProcess:
    cmd = launch_cmd(str(TRAIN_PY), "--config", str(config), *train_args, config_file="cpu_fsdp2.yaml")
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, theirs, and so on (Linux /proc). torchrun starts each worker in a session of
    its own, out of reach of a killpg of the launcher."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or process has just ended
            pass
    return children + [d for c in children for d in _descendants(c)]


def _all_sharded(stdout: str) -> bool:
    """The run said, once, that FSDP2 sharded every parameter tensor."""
    found = FSDP2_SHARDED.findall(stdout)
    return len(found) == 1 and found[0][0] == found[0][1]


def test_fsdp_asked_but_unsharded_model_stops_with_one_line():
    from minidpo.embedded import build_tiny_model, build_tokenizer
    from minidpo.errors import UserError
    from minidpo.distributed import check_sharded

    model = build_tiny_model(build_tokenizer(), num_layers=1)  # plain parameters, as DDP or one process holds them
    with pytest.raises(UserError) as e:
        check_sharded(model, fsdp_version=2, world=2)
    n = len(list(model.parameters()))
    assert e.value.code == "bad_config" and "\n" not in e.value.message
    assert f"none of the model's {n} parameter tensors is sharded" in e.value.message


@pytest.mark.slow
def test_cpu_fsdp2_shards_and_matches_single_process(assets, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    # 2 processes x 2 pairs against the reference's 1 x 4: the same global batches, as in the DDP test
    config = write_config(tmp_path / "fsdp.yaml", assets, tmp_path / "fsdp", per_device_train_batch_size=2,
                          save_steps=8)
    t = time.time()
    proc = _launch_fsdp2(config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _all_sharded(proc.stdout), proc.stdout[-3000:]
    saved = weights(tmp_path / "fsdp")  # same tensor names as the reference: the tied LM head saved once
    assert_matches_reference(tmp_path / "fsdp", reference, f"FSDP2 on 2 CPU processes ({time.time() - t:.0f} s)",
                             saved=saved)
    # an ordinary Transformers folder: loads anywhere, no FSDP needed
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").state_dict()
    assert bitwise_equal({k: loaded[k] for k in saved}, saved)


@pytest.mark.slow
def test_cpu_fsdp2_resume_after_sigkill(assets, reference, tmp_path):
    from minidpo.resilience import checkpoint_problem, latest_checkpoint

    config = write_config(tmp_path / "c.yaml", assets, tmp_path / "run", per_device_train_batch_size=2)
    run = _Proc(launch_cmd(str(TRAIN_PY), "--config", str(config), config_file="cpu_fsdp2.yaml"))
    run.wait_for(lambda: checkpoint_problem(tmp_path / "run" / "checkpoint-2") is None, what="checkpoint-2")
    for pid in [run.p.pid, *_descendants(run.p.pid)]:  # the launcher and both workers: none can clean up
        os.kill(pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    ckpt, _ = latest_checkpoint(tmp_path / "run")
    killed_at = int(ckpt.rsplit("-", 1)[1])
    assert killed_at < 8, "the run finished before the kill"

    proc = _launch_fsdp2(config, "--resume_from_checkpoint", "true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _all_sharded(proc.stdout), proc.stdout[-3000:]
    assert proc.stdout.count("{'loss'") == 8 - killed_at, "it did not start from the checkpoint"
    assert_matches_reference(tmp_path / "run", reference, f"FSDP2 killed after checkpoint-{killed_at}, resumed")


@pytest.mark.slow
def test_lora_under_cpu_fsdp2_matches_single_process(assets, tmp_path):
    from safetensors.torch import load_file

    lora = {**LORA, "max_steps": 4, "save_steps": 4}  # no LoRA dropout: each layout would draw other masks
    train_in_process(write_config(tmp_path / "one.yaml", assets, tmp_path / "one", **lora))
    proc = _launch_fsdp2(write_config(tmp_path / "two.yaml", assets, tmp_path / "two", per_device_train_batch_size=2,
                                      merge_adapter=True, **lora))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _all_sharded(proc.stdout), proc.stdout[-3000:]
    assert not (tmp_path / "two" / "model.safetensors").exists(), "the whole model saved instead of the adapter"
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert len(two) == 8  # lora_A and lora_B of q_proj and v_proj in each of the 2 layers
    assert max(v.abs().max().item() for k, v in two.items() if "lora_B" in k) > 0, "the adapter did not train"
    diff = max_abs_diff(two, one)
    losses = [step_losses(tmp_path / d / "checkpoint-4") for d in ("one", "two")]
    loss_diff = max(abs(losses[0][s] - losses[1][s]) for s in losses[0])
    print(f"\nLoRA under FSDP2 vs 1 process: max |adapter diff| {diff:.2e}, max |loss diff| {loss_diff:.2e}")
    assert diff <= 1e-5 and loss_diff <= 1e-5
    # merge_adapter: the saved adapter merged into the base (W + B A alpha/r), an ordinary model folder
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged").state_dict()
    base = weights(assets / "model")
    assert not any("lora" in k for k in merged)
    for name in ("q_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}"
        a, b = (two[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
        expected = base[f"{key}.weight"] + (b @ a) * (LORA["lora_alpha"] / LORA["lora_r"])
        assert (merged[f"{key}.weight"] - expected).abs().max().item() <= 1e-6

