"""DPO training throughput, side by side: minidpo, stock TRL (default and tuned) and a MiniMind-style loop.

    python scripts/bench.py --shape minimind2-small --steps 8 [--batch-size 4] [--max-length 1024] [--json out.json]

Every row trains the same random-init Llama (LlamaConfig, seed 0) from the same start on the same pairs
(`--steps` x `--batch-size` single-turn MiniMind-like records, ~410 tokens a sequence at max length 1024) with the
same objective: DPO sigmoid loss, beta 0.1, on length-averaged log-ratios (MiniMind's DPO), AdamW at a constant
learning rate, gradient clipping 1.0, one pass. The records are single-turn, so TRL's `sigmoid_norm` (which divides
the summed log-ratios by the completion length) is exactly that objective and scores exactly the tokens MiniMind's
masks score (answer plus `<|im_end|>\\n`); on multi-turn data it would not.

Rows, each run in its own subprocess so their peak memory does not mix:
  minidpo        MiniDPOTrainer at its best settings (see make_trainer): one pair per forward, `--batch-size` pairs per
                 optimizer step (gradient accumulation), packed pair rows, precomputed (cold) reference cache
  trl-default    stock `trl.DPOTrainer`, its defaults (gradient checkpointing on, reference forward each step), fp32
  trl-tuned      the same with `precompute_ref_log_probs=True` in the faster compute dtype of the machine: bf16
                 autocast (`use_cpu=True` on CPU) where the measured bf16 matmul peak beats fp32, else fp32
                 (`--dtype` overrides; the minidpo row uses the same dtype)
  minidpo-warm   (only with --rows) minidpo as a sweep's later run sees it: the reference cache already on disk
  minimind-loop  a loop written from MiniMind's train_dpo.py walkthrough: every sequence padded to max_length, full
                 logits + log_softmax + gather, a reference forward each step, fp32, torch AdamW

Columns:
  real tok/s   non-pad tokens of chosen + rejected trained on, per second of wall time from building the trainer to
               the end of the last step (tokenization and any reference precompute included)
  peak MB      peak RSS of the row's process (CPU) or torch.cuda.max_memory_allocated (GPU)
  MFU          model FLOPs / time / matmul peak of the row's compute dtype (fp32 or bf16), the peaks measured in
               this run (on a GPU listed in VENDOR_PEAK_TFLOPS the vendor's peak is printed beside them); model
               FLOPs = 8 * params * real tokens (6 for the policy forward + backward, 2 for the reference forward),
               attention score FLOPs and padding not counted. A row faster than the probed peak (a busy machine
               makes the probe read low) takes its own rate as the peak: MFU <= 100%
  final loss   the same fp32 loss function (full logits, length-averaged, beta 0.1) evaluated after training on all
               trained pairs, trained policy against the initial model; outside the timed region
  loss - parity row   against minimind-loop (else trl-default): a row off by more than LOSS_TOLERANCE of its dtype
               (fp32 1e-5, bf16 5e-4) is named and the bench exits 1

MFU can pass 100% for minidpo: prefix sharing computes the shared prompt once while real tokens count it twice.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# MiniMind2's real tokenizer (vocab 6400), shipped with the repository (Apache-2.0, see its NOTICE): every shape,
# the GPU machine's included, gets MiniMind2's vocabulary, never a silent stand-in.
MINIMIND2_TOKENIZER = REPO / "scripts" / "assets" / "tokenizers" / "minimind2"
SHAPES = {  # hidden, layers, heads, kv heads, intermediate; vocab from the tokenizer, embeddings tied
    "tiny": (64, 2, 4, 2, 176),
    "minimind2-small": (512, 8, 8, 2, 1408),
    "minimind2": (768, 16, 8, 2, 2048),
}
ROWS = ("minidpo", "trl-default", "trl-tuned", "minimind-loop")
EXTRA_ROWS = ("minidpo-warm",)  # on request (--rows): minidpo with its reference cache already on disk
PARITY_ROWS = ("minimind-loop", "trl-default")  # fp32 rows the others' final loss is checked against, first present
# |final loss - the parity row's| allowed, by the row's compute dtype. Measured on minimind2-small, 8 steps: fp32 6e-8
# (summation order), bf16 autocast 8e-6 (minidpo and trl-tuned alike), while summed instead of length-averaged
# log-ratios land 2.7e-3 away (tiny, 2 steps: 0, 2e-6 and 8e-5).
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-4}
BETA, LR, SEED = 0.1, 1e-4, 0

WORDS = ("the model answer data train loss token policy reference reward preference chosen rejected "
         "learning rate batch gradient step retreat team market growth plan customer service quality "
         "because therefore however first second finally example result value python code function").split()
HANZI = "我们的模型训练数据偏好回答问题这个方法可以需要使用进行学习优化结果分析系统用户助手内容"


# ------------------------------------------------------------------------------------------------ data and model

def bench_tokenizer():
    from minidpo.models import load_tokenizer

    return load_tokenizer(MINIMIND2_TOKENIZER)


def _text(rng: random.Random, tokenizer, n_tokens: int) -> str:
    parts, text = [], ""
    while len(tokenizer(text, add_special_tokens=False).input_ids) < n_tokens:
        for _ in range(8):
            parts.append("".join(rng.choices(HANZI, k=rng.randint(2, 4))) if rng.random() < 0.3 else rng.choice(WORDS))
            if rng.random() < 0.06:
                parts.append(".\n" if rng.random() < 0.3 else ",")
        text = " ".join(parts)
    return text


def make_records(tokenizer, n: int, max_length: int) -> list[dict]:
    """Single-turn MiniMind dpo.jsonl-like records: at max length 1024 a ~120-token prompt and ~250-token answers
    (~410 tokens a sequence with the chat template), lengths spread so batches carry padding. Scaled with
    max_length so every pair fits untruncated."""
    rng = random.Random(SEED)
    s = max_length / 1024
    records = []
    for _ in range(n):
        prompt = _text(rng, tokenizer, max(4, int(rng.uniform(30, 210) * s)))
        answers = [_text(rng, tokenizer, max(4, int(rng.uniform(95, 405) * s))) for _ in range(2)]
        user = [{"role": "user", "content": prompt}]
        records.append({"chosen": user + [{"role": "assistant", "content": answers[0]}],
                        "rejected": user + [{"role": "assistant", "content": answers[1]}]})
    return records


def to_trl(record: dict) -> dict:
    return {"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}


def build_model(tokenizer, shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32", attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return LlamaForCausalLM(config).float()


def encode_all(records, tokenizer, max_length):
    from minidpo.masking import encode_pair

    return [encode_pair(to_trl(r), tokenizer, max_length=max_length, mask_mode="last-turn") for r in records]


# ------------------------------------------------------------------------------------------------ the loss, in fp32

def mean_logps(model, encoded, device, batch=8):
    """The seed's logits_to_log_probs + masked mean over every chosen then rejected sequence (full logits, fp32)."""
    import torch

    seqs = [(e[f"{s}_input_ids"], e[f"{s}_loss_mask"]) for s in ("chosen", "rejected") for e in encoded]
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk], device=device)
        attn = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk], device=device)
        m = torch.tensor([mask[1:] + [0] * (width - len(mask)) for _, mask in chunk], device=device).float()
        logits = model(input_ids=x, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(2, x[:, 1:, None])[..., 0]
        out.append((logp * m).sum(1) / m.sum(1).clamp_min(1e-8))
    return torch.cat(out).view(2, -1)  # [chosen, rejected] x pairs


def final_loss(policy, ref, encoded, device) -> float:
    import torch
    import torch.nn.functional as F

    policy.eval()
    with torch.no_grad():
        (pc, pr), (rc, rr) = mean_logps(policy, encoded, device), mean_logps(ref, encoded, device)
        return (-F.logsigmoid(BETA * ((pc - rc) - (pr - rr)))).mean().item()


# ------------------------------------------------------------------------------------------------ rows

def _trl_args(cls, out, args, **kw):
    base = dict(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=LR, lr_scheduler_type="constant", beta=BETA, max_length=args.max_length,
                report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=SEED,
                use_cpu=args.device == "cpu", dataloader_num_workers=0)
    return cls(**{**base, **kw})


def make_trainer(name, args, tokenizer, records, policy, out):
    from datasets import Dataset

    if name.startswith("minidpo"):
        from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer

        # The same pairs per optimizer step as every row, one pair per forward (gradient accumulation): no padding,
        # and a working set that stays in cache. The reference cache starts empty (its precompute is timed) except
        # for minidpo-warm, where an untimed earlier run filled it.
        best = dict(loss_type=["sigmoid"], length_normalize=True, mask_mode="minimind", bf16=args.dtype == "bf16",
                    precompute_ref_log_probs=True, ref_cache_dir=str(Path(out) / "ref-cache"),
                    per_device_train_batch_size=1, gradient_accumulation_steps=args.batch_size,
                    precompute_ref_batch_size=1, share_prompt=True,
                    train_sampling_strategy="sequential")
        for item in args.set or []:  # --set key=value: one lever off (or on) at a time
            key, value = item.split("=", 1)
            best[key] = json.loads(value) if value[:1] in "0123456789-[{tfn\"" else value
        config = _trl_args(MiniDPOConfig, out, args, **best)
        trainer_cls = MiniDPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

        tuned = (dict(bf16=args.dtype == "bf16", precompute_ref_log_probs=True) if name == "trl-tuned"
                 else dict(bf16=False))
        config = _trl_args(DPOConfig, out, args, loss_type=["sigmoid_norm"],
                           train_sampling_strategy="sequential", **tuned)
        trainer_cls = DPOTrainer
    # A random-init policy has no path TRL could load the reference from: without a precompute, pass a copy.
    ref = None if config.precompute_ref_log_probs else copy.deepcopy(policy)
    return trainer_cls(policy, ref_model=ref, args=config,
                       train_dataset=Dataset.from_list([to_trl(r) for r in records]), processing_class=tokenizer)


def run_minimind_loop(args, tokenizer, encoded, policy, device):
    """MiniMind's train_dpo.py as the walkthrough describes it."""
    import torch
    import torch.nn.functional as F

    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(ids, fill):  # padding='max_length', then the shift
        return torch.tensor(ids + [fill] * (args.max_length - len(ids)))

    data = []
    for e in encoded:
        item = {}
        for s in ("chosen", "rejected"):
            ids, mask = padded(e[f"{s}_input_ids"], pad), padded(e[f"{s}_loss_mask"], 0)
            item.update({f"x_{s}": ids[:-1], f"y_{s}": ids[1:], f"mask_{s}": mask[1:]})
        data.append(item)

    def logits_to_log_probs(logits, labels):
        return torch.gather(F.log_softmax(logits, dim=2), dim=2, index=labels.unsqueeze(2)).squeeze(-1)

    def dpo_loss(ref_log_probs, policy_log_probs, mask, beta):
        seq_lengths = mask.sum(dim=1, keepdim=True).clamp_min(1e-8)
        ref_log_probs = (ref_log_probs * mask).sum(dim=1) / seq_lengths.squeeze()
        policy_log_probs = (policy_log_probs * mask).sum(dim=1) / seq_lengths.squeeze()
        n = ref_log_probs.shape[0] // 2
        logits = (policy_log_probs[:n] - policy_log_probs[n:]) - (ref_log_probs[:n] - ref_log_probs[n:])
        return -F.logsigmoid(beta * logits).mean()

    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    policy.train()
    for step in range(args.steps):
        batch = data[step * args.batch_size:(step + 1) * args.batch_size]
        cat = lambda k: torch.cat([torch.stack([b[f"{k}_chosen"] for b in batch]),  # noqa: E731
                                   torch.stack([b[f"{k}_rejected"] for b in batch])]).to(device)
        x, y, mask = cat("x"), cat("y"), cat("mask")
        with torch.no_grad():
            ref_log_probs = logits_to_log_probs(ref(x).logits, y)
        policy_log_probs = logits_to_log_probs(policy(x).logits, y)
        loss = dpo_loss(ref_log_probs, policy_log_probs, mask, BETA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return policy


def run_row(name, args) -> dict:
    import torch

    torch.manual_seed(SEED)
    device = args.device
    tokenizer = bench_tokenizer()
    records = make_records(tokenizer, args.steps * args.batch_size, args.max_length)
    encoded = encode_all(records, tokenizer, args.max_length)
    real_tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in encoded)
    policy = build_model(tokenizer, args.shape).to(device)
    n_params = sum(p.numel() for p in policy.parameters())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        if name == "minidpo-warm":  # a sweep's later run: an earlier run (untimed here) filled the reference cache
            make_trainer(name, args, tokenizer, records, copy.deepcopy(policy), out)
        start, cpu_start = time.perf_counter(), time.process_time()
        if name == "minimind-loop":
            policy, dtype = run_minimind_loop(args, tokenizer, encoded, policy, device), "fp32"
        else:
            trainer = make_trainer(name, args, tokenizer, records, policy, out)
            trainer.train()
            # what the row ran in (also under --set bf16=...), which picks its loss tolerance
            policy, dtype = trainer.model, "bf16" if trainer.args.bf16 else "fp32"
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    policy = policy.float().to(device)
    ref = build_model(tokenizer, args.shape).to(device).eval()
    return {"name": name, "seconds": seconds, "cpu_seconds": cpu_seconds, "real_tokens": real_tokens,
            "n_params": n_params, "real_tokens_per_s": real_tokens / seconds, "peak_mem_mb": peak_mb,
            "dtype": dtype,
            "final_loss": final_loss(policy, ref, encoded, device)}


# ------------------------------------------------------------------------------------------------ driver

# Vendor datasheet peaks, dense (no sparsity), TFLOP/s: (fp32 without TF32, which torch's matmul leaves off by
# default; bf16 tensor cores), matched by a substring of the CUDA device name, most specific first.
VENDOR_PEAK_TFLOPS = (("H100 PCIe", (51.0, 756.0)), ("H200", (67.0, 989.0)), ("H100", (67.0, 989.0)),
                      ("A100", (19.5, 312.0)))


def vendor_peak(device: str) -> tuple[str, dict] | None:
    """(device name, {dtype: GFLOP/s}) from VENDOR_PEAK_TFLOPS, or None off CUDA or for a GPU not listed."""
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((tflops for key, tflops in VENDOR_PEAK_TFLOPS if key in name), None)
    return None if peak is None else (name, {"float32": peak[0] * 1e3, "bfloat16": peak[1] * 1e3})


def matmul_peak(device: str, dtype_name: str, n: int = 2048, budget_s: float = 3.0) -> tuple[float, int]:
    """(best GFLOP/s, matrix size) of square matmuls of at most n x n, measured within about `budget_s` seconds on
    any machine.

    A dtype the machine runs slowly (bf16 on a CPU without native bf16: ~1 GFLOP/s, where one 2048 x 2048 matmul
    takes seconds) is measured on smaller matrices, never for minutes: the size doubles from 256 only while one
    matmul fits a tenth of the budget. Every size is warmed up before it is timed: the first product pays for
    cuBLAS's start-up and kernel choice (or a CPU's thread pool), which would stop the doubling at a small size
    whose lower throughput then passes for the peak.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warmed = set()

    def seconds(size: int, reps: int) -> float:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        if size not in warmed:  # the start-up is paid once per size: later calls go straight to timing
            torch.mm(a, b)
            warmed.add(size)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        return time.perf_counter() - t

    size, one = 256, seconds(256, 1)
    while size * 2 <= n and one * 8 <= budget_s / 10:  # the next size costs ~8x
        size *= 2
        one = seconds(size, 1)
    reps = max(1, int(budget_s / 4 / max(one, 1e-9)))
    return max(2 * size**3 * reps / seconds(size, reps) / 1e9 for _ in range(3)), size


def model_flops_utilization(n_params: int, real_tokens: int, seconds: float, peak_flops: float) -> tuple[float, bool]:
    """(MFU, probe_low): model FLOPs (8 * params * real tokens) per second over the matmul peak, and whether the
    peak probe read below the rate the row itself reached. The probe is a few seconds of matmuls, and on a machine
    busy with other work it reads low (1.5x low was seen), which would put MFU over 100%; a row's own rate is a
    lower bound of the peak, so the peak taken is the larger of the two and MFU stays in (0, 1]."""
    achieved = 8 * n_params * real_tokens / seconds
    return achieved / max(peak_flops, achieved), achieved > peak_flops


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="minimind2-small")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute dtype of the minidpo and trl-tuned rows; auto: the faster matmul of this machine")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated subset of {','.join(ROWS + EXTRA_ROWS)}")
    p.add_argument("--json", help="write the matmul peaks (measured; the vendor's where known), the parity "
                   "verdict and the rows to this file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a MiniDPOConfig field of the minidpo row (JSON values), to measure one lever")
    p.add_argument("--_row", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def loss_parity(results: list[dict]) -> tuple[dict | None, list[str]]:
    """The parity row (the first of PARITY_ROWS that ran) and the rows whose final loss is off it by more than
    LOSS_TOLERANCE of their compute dtype."""
    parity = next((r for name in PARITY_ROWS for r in results if r["name"] == name), None)
    if parity is None:
        return None, []
    return parity, [r["name"] for r in results
                    if abs(r["final_loss"] - parity["final_loss"]) > LOSS_TOLERANCE[r["dtype"]]]


def main(argv=None):
    args = parse(argv)
    if args._row:  # child: one row, its result as JSON
        result = run_row(args._row, args)
        Path(args._out).write_text(json.dumps(result))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS + EXTRA_ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; choose from {ROWS + EXTRA_ROWS}")
    # A GPU reaches its peak only on large products (8192^3 bf16 on an H200: ~1.4 ms); a CPU's is reached by 2048.
    n = 1024 if args.shape == "tiny" else 8192 if args.device.startswith("cuda") else 2048
    probes = {d: matmul_peak(args.device, d, n, budget_s=1.0 if args.shape == "tiny" else 3.0)
              for d in ("float32", "bfloat16")}
    peaks = {d: gflops for d, (gflops, _) in probes.items()}
    if args.dtype == "auto":
        args.dtype = "bf16" if peaks["bfloat16"] > peaks["float32"] else "fp32"
    vendor = vendor_peak(args.device)
    print(f"[bench] {args.shape}, {args.steps} steps x {args.batch_size} pairs, max_length {args.max_length}, "
          f"device {args.device}; matmul peak fp32 {peaks['float32']:.0f} GFLOP/s (n={probes['float32'][1]}), "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s (n={probes['bfloat16'][1]}) -> tuned rows in {args.dtype}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    print("[bench] vendor peak: " + (f"{vendor[0]}, dense: fp32 {vendor[1]['float32']:.0f} GFLOP/s, bf16 "
          f"{vendor[1]['bfloat16']:.0f} GFLOP/s; measured / vendor: fp32 "
          f"{peaks['float32'] / vendor[1]['float32']:.0%}, bf16 {peaks['bfloat16'] / vendor[1]['bfloat16']:.0%}"
          if vendor else "none listed for this device (VENDOR_PEAK_TFLOPS)"), flush=True)
    results = []
    for name in rows:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--_row", name, "--_out", f.name, "--shape", args.shape,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--device", args.device, "--dtype", args.dtype]
            cmd += [f"--set={item}" for item in args.set or []]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode:
                sys.exit(f"row {name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}")
            r = json.loads(Path(f.name).read_text())
        peak = peaks["float32" if r["dtype"] == "fp32" else "bfloat16"] * 1e9
        r["mfu"], r["peak_probe_low"] = model_flops_utilization(r["n_params"], r["real_tokens"], r["seconds"], peak)
        if r["peak_probe_low"]:
            print(f"[bench] {name}: ran faster than the matmul peak probe measured (the machine was busy while "
                  "probing): its MFU is shown as 100%, the peak taken as its own rate", flush=True)
        r["load"] = os.getloadavg()[0]
        results.append(r)
        print(f"[bench] {name}: {r['real_tokens_per_s']:.0f} real tok/s, {r['peak_mem_mb']:.0f} MB, "
              f"loss {r['final_loss']:.5f} ({r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, load {r['load']:.2f})",
              flush=True)
    base = {r["name"]: r["real_tokens_per_s"] for r in results}
    parity, off = loss_parity(results)
    print("\n| row | real tok/s | peak MB | MFU | final loss | loss - parity row | minidpo speedup |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        speedup = f"{base['minidpo'] / r['real_tokens_per_s']:.2f}x" if "minidpo" in base else "-"
        delta = "-" if parity is None else f"{r['final_loss'] - parity['final_loss']:+.1e}"
        print(f"| {r['name']} ({r['dtype']}) | {r['real_tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['final_loss']:.5f} | {delta} | {speedup} |")
    if args.json:
        keys = ("name", "real_tokens_per_s", "peak_mem_mb", "mfu", "final_loss")
        Path(args.json).write_text(json.dumps({
            "matmul_peak_gflops": peaks, "vendor": vendor and {"device": vendor[0], "peak_gflops": vendor[1]},
            "parity": parity and {"row": parity["name"], "off": off},
            "rows": [{k: r[k] for k in keys} for r in results]}, indent=1))
    if parity is not None:
        bound = ", ".join(f"{dtype} {tol:.0e}" for dtype, tol in LOSS_TOLERANCE.items())
        print(f"\nfinal loss against {parity['name']}: " + (f"every row within tolerance ({bound})" if not off else
              f"OUT OF TOLERANCE ({bound}): {', '.join(off)}"))
        if off:  # speed bought with a different objective is no speed
            sys.exit(1)


if __name__ == "__main__":
    main()
