"""Evaluation after training (`minidpo eval`): does the trained model prefer the chosen answers of held-out pairs
more than its reference?

    minidpo eval --model runs/dpo --data data/eval.jsonl [--ref runs/sft] [--generate 5]

For every pair, both models score both sides with `minidpo.masking.encode_pair` masks (the tokens training
scored) and the same `PairCollator` batches training uses; the reward of a side is `beta * (policy - reference)`
log-prob, the margin is chosen minus rejected reward, accuracy the share of pairs with a positive margin. Each is
reported twice: with log-probs averaged over scored tokens (MiniMind's DPO, `length_normalize: true`) and summed
(TRL's default), whatever the model was trained with. With `--generate N`, the first N prompts are answered
greedily by the reference and the policy, printed side by side and written to `eval.md`; the metrics go to
`eval.json`.

The reference is `--ref`, else the base recorded by training: a LoRA adapter's `base_model_name_or_path`, else
`base_model` in the run's summary.json, else the config's `_name_or_path`.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

from minidpo import loading, markdown
from minidpo.errors import UserError
from minidpo.files import write_text_atomic
from minidpo.masking import DEFAULT_MAX_LENGTH, encode_pair, is_scorable
from minidpo.models import check_vocab, ensure_pad_token, load_causal_lm, load_tokenizer
from minidpo.records import last_user_message

DEFAULT_BETA = 0.1  # MiniMind's and TRL's


# ---------------------------------------------------------------------------------------------------------
# Loading


def _run_summary(model_dir: Path) -> dict:
    path = model_dir / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def resolve_reference(model_dir: Path, ref: str | None) -> str:
    if ref:
        return ref
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base:
            return base
    base = _run_summary(model_dir).get("base_model")
    if base:
        return base
    config = model_dir / "config.json"
    if config.is_file():
        base = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        if base and Path(base).resolve() != model_dir.resolve():
            return base
    raise UserError(f"cannot tell which model {model_dir} was trained from: pass --ref DIR (the reference model)",
                    code="missing_path")


def scoring_model(path: str, what: str):
    """A causal LM (model or LoRA adapter folder) in fp32 and eval mode, with TRL's fused LM head added."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {str(p)!r} does not exist", code="missing_path")
    model = load_causal_lm(p, what=what, dtype=torch.float32)
    add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return model.eval()


def find_tokenizer(model_dir: Path, ref: str):
    """The tokenizer saved with the model, else the reference's; eos pads when it has no pad token."""
    for candidate in (model_dir, Path(ref)):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            tok = load_tokenizer(candidate)
            ensure_pad_token(tok)
            return tok
    raise UserError(f"no tokenizer in {model_dir} or {ref}: save the tokenizer with the model", code="missing_path")


def held_out_pairs(path: str, tokenizer, limit: int | None) -> list[dict]:
    """Held-out pairs: a convert directory's eval split (else its train split), or every pair of a file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data {str(p)!r} does not exist", code="missing_path")
    fmt = loading.detect_format(p)
    records, rejects = loading.load_trl_records(p, "eval", tokenizer, fmt)
    if not records:
        records, rejects = loading.load_trl_records(p, "train", tokenizer, fmt)
    if rejects:
        print(f"[minidpo eval] {len(rejects)} lines of {p} rejected (run `minidpo convert` to see why)")
    if not records:
        raise UserError(f"no usable preference pair in {p}", code="bad_data")
    return records[:limit] if limit else records


# ---------------------------------------------------------------------------------------------------------
# Reward metrics


def sequence_logps(model, batch) -> tuple:
    """(summed, mean) log-prob of the scored tokens of each row; `completion_mask[i]` marks token i, predicted
    at position i - 1, exactly as the trainer reads it. Through TRL's fused LM head, as in training: no
    full-vocabulary logits (for a 150k-token vocabulary they would not fit)."""
    import torch

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True)
    summed = out.log_probs.float().sum(-1)
    return summed, summed / (labels[:, 1:] != -100).sum(-1).clamp(min=1)


def score_pairs(policy, ref, tokenizer, records, max_length, mask_mode="minimind", batch_size=8, beta=0.1):
    """Per-pair `{avg, sum}` policy and reference log-probs of both sides, and the aggregate metrics."""
    from minidpo.pairs import PairCollator

    collate = PairCollator(tokenizer.pad_token_id)
    encoded, skipped = [], 0
    for r in records:
        e = encode_pair(r, tokenizer, max_length=max_length, mask_mode=mask_mode)
        if is_scorable(e):
            encoded.append(e)
        else:
            skipped += 1  # the trainer drops these too
    if not encoded:
        raise UserError(f"no pair has a scored token at max_length={max_length}: raise --max-length", code="bad_data")
    rows = {f"{m}_{side}_{kind}": [] for m in ("policy", "ref") for side in ("chosen", "rejected")
            for kind in ("sum", "avg")}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = collate(chunk)
        n = len(chunk)
        for name, model in (("policy", policy), ("ref", ref)):
            summed, mean = sequence_logps(model, batch)
            for kind, values in (("sum", summed), ("avg", mean)):
                rows[f"{name}_chosen_{kind}"] += values[:n].tolist()
                rows[f"{name}_rejected_{kind}"] += values[n:].tolist()
    metrics = {"pairs": len(encoded), "pairs_skipped_no_scored_token": skipped, "beta": beta,
               "max_length": max_length, "mask_mode": mask_mode}
    for kind, label in (("avg", "length_averaged"), ("sum", "summed")):
        chosen = [beta * (p - r) for p, r in zip(rows[f"policy_chosen_{kind}"], rows[f"ref_chosen_{kind}"])]
        rejected = [beta * (p - r) for p, r in zip(rows[f"policy_rejected_{kind}"], rows[f"ref_rejected_{kind}"])]
        margins = [c - r for c, r in zip(chosen, rejected)]
        n = len(margins)
        metrics[label] = {
            "reward_accuracy": sum(m > 0 for m in margins) / n,
            "reward_margin": sum(margins) / n,
            "reward_chosen": sum(chosen) / n,
            "reward_rejected": sum(rejected) / n,
            "sigmoid_loss": sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / n,
            "policy_logps_chosen": sum(rows[f"policy_chosen_{kind}"]) / n,
            "policy_logps_rejected": sum(rows[f"policy_rejected_{kind}"]) / n,
            "ref_logps_chosen": sum(rows[f"ref_chosen_{kind}"]) / n,
            "ref_logps_rejected": sum(rows[f"ref_rejected_{kind}"]) / n,
        }
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Generation


def generate(model, tokenizer, prompt: list[dict], max_new_tokens: int = 64) -> str:
    import torch

    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    # An answer of whitespace or special tokens only (an untrained model's newlines, say) would print as nothing
    # at all: show it quoted, escapes visible.
    raw = tokenizer.decode(new, skip_special_tokens=False)
    return text or (repr(raw) if raw else "")


def side_by_side(policy, ref, tokenizer, records, n: int, max_new_tokens: int = 64, seed: int = 0) -> list[dict]:
    import torch

    torch.manual_seed(seed)  # greedy decoding does not sample; the seed pins anything that would
    out = []
    for r in records[:n]:
        out.append({"prompt": r["prompt"], "reference": generate(ref, tokenizer, r["prompt"], max_new_tokens),
                    "policy": generate(policy, tokenizer, r["prompt"], max_new_tokens),
                    "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]})
    return out


def format_terminal(samples: list[dict], width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = max(30, (width - 3) // 2)
    lines = []
    for i, s in enumerate(samples, 1):
        turns = len([m for m in s["prompt"] if m["role"] == "user"])
        lines.append("=" * min(width, 2 * col + 3))
        lines.append(f"[{i}] {last_user_message(s['prompt'])}" + (f"  ({turns} user turns)" if turns > 1 else ""))
        left = textwrap.wrap(s["reference"] or "(empty)", col) or [""]
        right = textwrap.wrap(s["policy"] or "(empty)", col) or [""]
        lines.append(f"{'reference':<{col}} | policy")
        lines.append(f"{'-' * col}-+-{'-' * col}")
        for k in range(max(len(left), len(right))):
            a = left[k] if k < len(left) else ""
            b = right[k] if k < len(right) else ""
            lines.append(f"{a:<{col}} | {b}")
    return "\n".join(lines)


def write_outputs(out: Path, metrics: dict, samples: list[dict], model: str, ref: str, data: str) -> None:
    """eval.json (metrics and samples) and eval.md (the table people read) in `out`."""
    result = {"model": model, "reference": ref, "data": data, **metrics, "samples": samples}
    write_text_atomic(out / "eval.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    lines = [f"# Evaluation of `{model}`", "", f"Reference `{ref}`, data `{data}`: {metrics['pairs']} pairs "
             f"(beta {metrics['beta']}, max_length {metrics['max_length']}, mask mode {metrics['mask_mode']}).", "",
             *markdown.table(["log-probs", "reward accuracy", "reward margin", "chosen reward", "rejected reward",
                              "sigmoid loss"],
                             [(label.replace("_", " "), f"{m['reward_accuracy']:.3f}", f"{m['reward_margin']:.4f}",
                               f"{m['reward_chosen']:.4f}", f"{m['reward_rejected']:.4f}", f"{m['sigmoid_loss']:.4f}")
                              for label, m in ((k, metrics[k]) for k in ("length_averaged", "summed"))])]
    lines += ["", "Accuracy is the share of pairs whose chosen answer gains more reward (policy vs reference "
                  "log-prob) than the rejected one; 0.5 is chance. Length-averaged is MiniMind's DPO "
                  "(`length_normalize: true`), summed is TRL's.", ""]
    if samples:
        lines += ["## Answers side by side (greedy)", ""]
        lines += markdown.table(["prompt", "reference", "policy", "chosen in the data"],
                                [[last_user_message(s["prompt"]) or "*(empty)*", *(s[k] or "*(empty)*" for k in
                                                                                  ("reference", "policy", "chosen"))]
                                 for s in samples])
    write_text_atomic(out / "eval.md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------


def evaluate(model, data=None, ref=None, output=None, generate_n=0, max_new_tokens=64, max_length=None, batch_size=8,
             beta=None, mask_mode=None, limit=None, seed=0) -> dict:
    model_dir = Path(model).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"--model {str(model_dir)!r} is not a model folder", code="missing_path")
    run = _run_summary(model_dir).get("config", {})
    beta = beta if beta is not None else run.get("beta", DEFAULT_BETA)
    max_length = max_length or run.get("max_length") or DEFAULT_MAX_LENGTH
    mask_mode = mask_mode or run.get("mask_mode", "minimind")
    if data is None:
        data = model_dir / loading.EVAL_PAIRS
        if not data.is_file():
            raise UserError(f"{model_dir} holds no {loading.EVAL_PAIRS} (the run held out no pairs): pass --data",
                            code="missing_path")
    ref_path = resolve_reference(model_dir, ref)
    tokenizer = find_tokenizer(model_dir, ref_path)
    records = held_out_pairs(data, tokenizer, limit)
    policy = scoring_model(str(model_dir), "model")
    reference = scoring_model(ref_path, "reference model")
    check_vocab(tokenizer, reference, f"the reference {ref_path}", "pass the --ref the model was trained from")
    print(f"[minidpo eval] {len(records)} pairs; policy {model_dir}, reference {ref_path}; beta {beta}")
    metrics = score_pairs(policy, reference, tokenizer, records, max_length, mask_mode, batch_size, beta)
    samples = side_by_side(policy, reference, tokenizer, records, generate_n, max_new_tokens, seed) if generate_n else []
    out = Path(output) if output else model_dir / "eval"
    write_outputs(out, metrics, samples, str(model_dir), str(ref_path), str(data))
    for label in ("length_averaged", "summed"):
        m = metrics[label]
        print(f"{label:>15}: reward accuracy {m['reward_accuracy']:.3f}, margin {m['reward_margin']:.4f} "
              f"(chosen {m['reward_chosen']:.4f}, rejected {m['reward_rejected']:.4f})")
    if samples:
        print(format_terminal(samples))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return {**metrics, "samples": samples, "output": str(out)}
