"""scripts/bench.py runs end to end, and the speed levers of MiniDPOTrainer keep the loss."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer

REPO = Path(__file__).resolve().parents[1]


WITHIN_TOLERANCE = "final loss against minimind-loop: every row within tolerance"


def _bench(*args: str, rc: int = 0) -> str:
    """stdout of a tiny two-step bench run, which must exit with `rc`."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--shape", "tiny", "--steps", "2",
                           "--max-length", "128", "--device", "cpu", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    stdout = _bench("--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["minidpo", "trl-default", "trl-tuned", "minimind-loop"]
    for r in rows:
        assert set(r) == {"name", "real_tokens_per_s", "peak_mem_mb", "mfu", "final_loss"}
        assert r["real_tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and 0 < r["mfu"] < 1
    assert re.search(r"^\| minidpo \((fp32|bf16)\) \| \d+ \|", stdout, re.M), stdout
    assert WITHIN_TOLERANCE in stdout, stdout


@pytest.mark.slow
def test_bench_bf16_rows_keep_the_loss():
    """bf16 autocast (the tuned rows' dtype on CPUs with native bf16) against the fp32 loop, forced on any CPU."""
    stdout = _bench("--dtype", "bf16", "--rows", "minidpo,minimind-loop")
    assert re.search(r"^\| minidpo \(bf16\) \|", stdout, re.M), stdout
    assert WITHIN_TOLERANCE in stdout, stdout


@pytest.mark.slow
def test_bench_fails_a_row_trained_on_another_objective():
    """Summed instead of length-averaged log-ratios: a different objective, whatever its speed."""
    stdout = _bench("--rows", "minidpo,minimind-loop", "--set", "length_normalize=false", rc=1)
    assert re.search(r"^final loss against minimind-loop: OUT OF TOLERANCE .*: minidpo$", stdout, re.M), stdout


def test_loss_parity_names_the_rows_off_their_dtype_tolerance():
    bench = _load_bench()
    fp32, bf16 = bench.LOSS_TOLERANCE["fp32"], bench.LOSS_TOLERANCE["bf16"]
    assert fp32 < bf16
    row = lambda name, dtype, loss: {"name": name, "dtype": dtype, "final_loss": loss}  # noqa: E731
    rows = [row("minidpo", "bf16", 0.5 + (fp32 + bf16) / 2), row("trl-default", "fp32", 0.5 + 2 * fp32),
            row("trl-tuned", "fp32", 0.5 - fp32 / 2), row("minimind-loop", "fp32", 0.5)]
    parity, off = bench.loss_parity(rows)
    assert parity["name"] == "minimind-loop" and off == ["trl-default"]
    parity, off = bench.loss_parity(rows[:3])  # no loop: stock TRL's fp32 row is the reference
    assert parity["name"] == "trl-default" and off == ["trl-tuned"]
    assert bench.loss_parity(rows[:1]) == (None, [])


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trl(record):
    return {"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}


def _loss_and_grads(tmp_path, data, **kw):
    tok = build_tokenizer()
    policy = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    args = MiniDPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(data), beta=5.0,
                         report_to="none", max_length=512, **kw)
    trainer = MiniDPOTrainer(policy, ref_model=None if args.precompute_ref_log_probs else build_tiny_model(tok),
                             args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}, trainer


def test_shared_prompt_matches_two_sequences(tmp_path):
    data = [_trl(r) for r in make_preference_records(8, seed=5, multi_turn_fraction=0.5)]
    loss, grads, _ = _loss_and_grads(tmp_path, data, share_prompt=True)
    ref_loss, ref_grads, _ = _loss_and_grads(tmp_path, data, share_prompt=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


def test_one_pair_per_forward_with_accumulation_is_the_same_update(tmp_path):
    """The bench's minidpo row: batch 1 x accumulation 4 must train exactly like batch 4 (same pairs per step)."""
    data = [_trl(r) for r in make_preference_records(8, seed=11, multi_turn_fraction=0.5)]
    tok = build_tokenizer()

    def update(batch, accumulation):
        policy = build_tiny_model(tok, seed=0)
        # SGD: the update is the gradient itself (Adam's first step would hide its scale); lr 100 keeps it far above
        # the float32 rounding of the weights.
        start = {n: p.detach().clone() for n, p in policy.named_parameters()}
        args = MiniDPOConfig(output_dir=str(tmp_path / f"b{batch}"), report_to="none", max_length=512, max_steps=2,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             optim="sgd", learning_rate=100.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             train_sampling_strategy="sequential", precompute_ref_log_probs=True,
                             ref_cache_dir=str(tmp_path / "cache"), save_strategy="no", seed=3)
        trainer = MiniDPOTrainer(policy, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
        trainer.train()
        return {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}

    together, accumulated = update(4, 1), update(1, 4)
    for name, delta in together.items():
        assert delta.abs().max() > 0, name
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-5 * delta.abs().max().item(),
                                   msg=name)


def test_reference_cache_is_reused_across_runs(tmp_path, monkeypatch):
    data = [_trl(r) for r in make_preference_records(6, seed=7)]
    cache = tmp_path / "cache"
    kw = dict(precompute_ref_log_probs=True, ref_cache_dir=str(cache), precompute_ref_batch_size=4)
    tok = build_tokenizer()

    def trainer():
        args = MiniDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=512, **kw)
        return MiniDPOTrainer(build_tiny_model(tok, seed=0), args=args, train_dataset=Dataset.from_list(data),
                              processing_class=tok)

    first = trainer()
    files = list((cache / "ref-logps").glob("*.pt"))
    assert len(files) == 1
    computed, compute = [], MiniDPOTrainer._compute_ref_logps_sorted
    monkeypatch.setattr(MiniDPOTrainer, "_compute_ref_logps_sorted",
                        lambda *a: computed.append(1) or compute(*a))
    second = trainer()  # a new run, new in-memory dataset: read from disk
    assert not computed
    assert first.train_dataset["ref_chosen_logps"] == second.train_dataset["ref_chosen_logps"]
    # length-sorted precompute equals the in-loop reference forward of the same batch
    model = first.model
    batch = first.data_collator([first.train_dataset[i] for i in range(len(data))])
    chosen, rejected = first.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(chosen, batch["ref_chosen_logps"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rejected, batch["ref_rejected_logps"], rtol=1e-5, atol=1e-6)
    # another max_length is another key
    args = MiniDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=256, **kw)
    MiniDPOTrainer(build_tiny_model(tok, seed=0), args=args, train_dataset=Dataset.from_list(data),
                   processing_class=tok)
    assert len(computed) == 1


def test_group_by_length_sampler(tmp_path):
    data = [_trl(r) for r in make_preference_records(40, seed=9, multi_turn_fraction=0.5)]
    tok = build_tokenizer()
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                         train_sampling_strategy="group_by_length")
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args,
                             train_dataset=Dataset.from_list(data), processing_class=tok)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(40))
    lengths = [len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in trainer.train_dataset]
    assert lengths[order[0]] == max(lengths)  # the longest batch first, as transformers' sampler does
