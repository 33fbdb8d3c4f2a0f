"""`minidpo report-data`'s work: what is in a preference set, before training on it.

Counts, rejects, token lengths, length bias of chosen vs rejected, turns, duplicates and truncation, computed with
the masks and the truncation training will use (`minidpo.masking.encode_pair`), written as report.md +
report.json + PNGs.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter
from pathlib import Path

from minidpo import loading, markdown
from minidpo.convert import LengthStats
from minidpo.errors import UserError
from minidpo.files import write_text_atomic
from minidpo.masking import DEFAULT_MAX_LENGTH, check_mask_mode, check_tokenizer, encode_pair, is_scorable
from minidpo.plotting import figure, save
from minidpo.records import last_user_message

_LONGEST = 10


def _record_key(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def _snippet(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _load_for_report(path: Path, tokenizer) -> tuple[str, dict, list, dict]:
    """(format, {split: records}, rejects, convert stats or {}) through minidpo.loading."""
    fmt = loading.detect_format(path)
    splits, rejects = {}, []
    for split in ("train", "eval"):
        records, bad = loading.load_trl_records(path, split, tokenizer, fmt)
        if records:
            splits[split] = records
        rejects += bad
    convert_stats = {}
    if fmt == "convert-dir":
        # Lines `convert` rejected never reached train.jsonl: count them from its own outputs.
        if (path / "stats.json").is_file():
            convert_stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        if (path / "rejects.jsonl").is_file():
            with open(path / "rejects.jsonl", encoding="utf-8") as f:
                rejects += [json.loads(line) for line in f if line.strip()]
    return fmt, splits, rejects, convert_stats


def _length_advice(share_longer: float, share_shorter: float, mean_ratio: float) -> str:
    if share_longer >= 0.6 or mean_ratio >= 1.15:
        return ("Chosen answers are systematically longer than rejected ones. With `length_normalize: false` "
                "(summed log-probs, TRL's default) the loss can be lowered by favouring longer answers, so the "
                "model may learn length rather than quality; `length_normalize: true` (MiniMind's mean over "
                "scored tokens, minidpo's default) removes that incentive.")
    if share_shorter >= 0.6 or mean_ratio <= 1 / 1.15:
        return ("Chosen answers are systematically shorter than rejected ones. With `length_normalize: false` "
                "(summed log-probs) the loss can be lowered by favouring shorter answers; `length_normalize: "
                "true` (minidpo's default) averages over scored tokens and removes that incentive.")
    return ("Chosen and rejected answers have similar lengths, so summed and length-averaged log-probs "
            "(`length_normalize`) should not differ much in how they treat length on this data.")


def analyse_records(splits: dict, tokenizer, max_length: int, mask_mode: str = "minimind") -> dict:
    """The numbers of the data report for records already loaded, tokenized with `masking.encode_pair`."""
    lengths = {k: LengthStats() for k in ("prompt", "chosen_scored", "rejected_scored", "sequence")}
    per_pair = {"prompt": [], "chosen_scored": [], "rejected_scored": [], "sequence": []}
    turns, seen, prompts_seen = {}, set(), set()
    n = longer = shorter = equal = duplicates = repeated_prompts = 0
    ratios, longest = [], []
    truncated = answer_cut = nothing_to_score = identical = 0
    for split, records in splits.items():
        for i, record in enumerate(records):
            n += 1
            key = _record_key(record)
            duplicates += key in seen
            seen.add(key)
            pkey = _record_key(record["prompt"])
            repeated_prompts += pkey in prompts_seen
            prompts_seen.add(pkey)
            nturn = sum(m["role"] == "user" for m in record["prompt"])
            turns[nturn] = turns.get(nturn, 0) + 1

            full = encode_pair(record, tokenizer, max_length=None, mask_mode=mask_mode)
            prompt_len = len(full["prompt_ids"])
            c, r = sum(full["chosen_loss_mask"]), sum(full["rejected_loss_mask"])
            seq = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
            for name, v in (("prompt", prompt_len), ("chosen_scored", c), ("rejected_scored", r), ("sequence", seq)):
                lengths[name].add(v)
                per_pair[name].append(v)
            longer += c > r
            shorter += c < r
            equal += c == r
            if r:
                ratios.append(c / r)
            if seq > max_length:
                truncated += 1
                # Only the long pairs are encoded again, cut exactly as the trainer will cut them.
                cut = encode_pair(record, tokenizer, max_length=max_length, mask_mode=mask_mode)
                if not is_scorable(cut):
                    nothing_to_score += 1
                elif cut["chosen_input_ids"] == cut["rejected_input_ids"]:
                    identical += 1  # the answers differ only beyond max_length: loss ln 2, nothing learnt
                elif (sum(cut["chosen_loss_mask"]), sum(cut["rejected_loss_mask"])) != (c, r):
                    answer_cut += 1
            last_user = last_user_message(record["prompt"])
            # a min-heap of the _LONGEST longest so far: bounded memory, no sort per record
            (heapq.heappush if len(longest) < _LONGEST else heapq.heappushpop)(
                longest, (seq, split, i, prompt_len, c, r, _snippet(last_user)))
    longest = sorted(longest, reverse=True)
    share_longer = longer / n if n else 0.0
    share_shorter = shorter / n if n else 0.0
    mean_ratio = sum(ratios) / len(ratios) if ratios else float("nan")
    return {
        "pairs": n,
        "token_lengths": {k: v.summary() for k, v in lengths.items()},
        "length_bias": {
            "chosen_longer": longer, "rejected_longer": shorter, "equal": equal,
            "share_chosen_longer": round(share_longer, 4), "share_rejected_longer": round(share_shorter, 4),
            "mean_length_ratio": round(mean_ratio, 4),
            "advice": _length_advice(share_longer, share_shorter, mean_ratio) if n else "",
        },
        "turns_per_conversation": dict(sorted(turns.items())),
        "duplicates": {"exact_duplicate_pairs": duplicates, "repeated_prompts": repeated_prompts},
        "truncation": {
            "max_length": max_length, "longer_than_max_length": truncated,
            "scored_tokens_cut": answer_cut, "nothing_left_to_score": nothing_to_score,
            "identical_after_truncation": identical,
            "longest": [{"tokens": s, "split": sp, "index": i, "prompt_tokens": p, "chosen_scored": c,
                         "rejected_scored": r, "last_user_message": u} for s, sp, i, p, c, r, u in longest],
        },
        "_per_pair": per_pair,  # for the plots; not written to report.json
    }


def _plot_data_report(per_pair: dict, turns: dict, max_length: int, out: Path) -> list[Path]:
    written = []
    c, r = per_pair["chosen_scored"], per_pair["rejected_scored"]

    fig = figure(2, 1, width=5.2)
    ax1, ax2 = fig.subplots(1, 2)
    top = max(c + r + [1])
    bins = _bins(top)
    ax1.hist(c, bins=bins, alpha=0.55, color="tab:green", label="chosen")
    ax1.hist(r, bins=bins, alpha=0.55, color="tab:red", label="rejected")
    ax1.set(title="Scored answer tokens", xlabel="tokens scored per sequence", ylabel="pairs")
    ax1.legend()
    ax2.hist(per_pair["prompt"], bins=_bins(max(per_pair["prompt"] + [1])), color="tab:blue")
    ax2.set(title="Prompt tokens (template included)", xlabel="tokens", ylabel="pairs")
    written.append(save(fig, out / "lengths.png"))

    fig = figure(width=5.0, height=4.6)
    ax = fig.add_subplot()
    ax.scatter(r, c, s=8, alpha=0.35, color="tab:purple")
    ax.plot([0, top], [0, top], color="gray", linestyle="--", label="equal length")
    ax.set(title="Chosen vs rejected scored tokens (one dot per pair)", xlabel="rejected", ylabel="chosen")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.legend(loc="upper left")
    written.append(save(fig, out / "length_pairs.png"))

    fig = figure()
    ax = fig.add_subplot()
    seq = per_pair["sequence"]
    ax.hist(seq, bins=_bins(max(seq + [max_length + 1])), color="tab:gray")
    ax.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length {max_length}")
    over = sum(s > max_length for s in seq)
    ax.set(title=f"Longest side of each pair: {over} of {len(seq)} longer than max_length",
           xlabel="tokens", ylabel="pairs")
    ax.legend()
    written.append(save(fig, out / "sequence_lengths.png"))

    fig = figure(width=4.5)
    ax = fig.add_subplot()
    ax.bar([str(k) for k in turns], list(turns.values()), color="tab:cyan")
    ax.set(title="User turns per conversation", xlabel="user turns", ylabel="pairs")
    written.append(save(fig, out / "turns.png"))
    return written


def _bins(top: int) -> list:
    step = max(1, math.ceil((top + 1) / 40))
    return list(range(0, top + step + 1, step))


def _report_markdown(rep: dict) -> str:
    c = rep["counts"]
    lb, tr, tl = rep["length_bias"], rep["truncation"], rep["token_lengths"]
    lines = [f"# Data report: `{rep['input']}`", "",
             f"Format **{rep['format']}**, tokenizer `{rep['tokenizer']}`, mask mode `{rep['mask_mode']}`, "
             f"max_length {tr['max_length']}.", "",
             "## Counts", ""]
    lines += markdown.table(["", "pairs"], [["records read", c["records_read"]], ["usable pairs", c["usable"]],
                                       *[[f"  in {k}", v] for k, v in c["by_split"].items()],
                                       ["rejected lines", c["rejected"]]])
    if rep["rejected_by_reason"]:
        lines += ["", "Rejected lines by reason (see `minidpo convert`'s rejects.jsonl for each line):", ""]
        lines += markdown.table(["reason", "lines"], rep["rejected_by_reason"].items())
    lines += ["", "## Token lengths", "",
              "Scored tokens are the ones the loss reads (`encode_pair` masks: the assistant answers and their "
              "end-of-turn token); prompt tokens are the rendered prompt with the assistant header.", ""]
    lines += markdown.table(["", "min", "mean", "p50", "p90", "p99", "max"],
                       [[k, *(s.get(q, "") for q in ("min", "mean", "p50", "p90", "p99", "max"))]
                        for k, s in tl.items()])
    lines += ["", "![lengths](lengths.png)", "",
              "## Chosen vs rejected length", "",
              f"Chosen is longer in **{lb['share_chosen_longer']:.0%}** of pairs, rejected in "
              f"{lb['share_rejected_longer']:.0%}, equal in {lb['equal']} pairs; mean chosen/rejected ratio of "
              f"scored tokens **{lb['mean_length_ratio']:.2f}**.", "", lb["advice"], "",
              "![length pairs](length_pairs.png)", "",
              "## Turns and duplicates", ""]
    lines += markdown.table(["user turns", "pairs"], rep["turns_per_conversation"].items())
    d = rep["duplicates"]
    lines += ["", f"{d['exact_duplicate_pairs']} exact duplicate pairs (extra copies of an identical record), "
                  f"{d['repeated_prompts']} pairs repeat a prompt seen earlier with other answers.", "",
              "![turns](turns.png)", "",
              f"## Truncation at max_length {tr['max_length']}", "",
              f"{tr['longer_than_max_length']} of {rep['pairs']} pairs are longer than max_length: "
              f"{tr['scored_tokens_cut']} lose scored answer tokens, {tr['nothing_left_to_score']} keep nothing "
              "to score and would be dropped by the trainer, "
              f"{tr['identical_after_truncation']} are identical after truncation (chosen and rejected differ only "
              "beyond max_length: they train at loss ln 2 and teach nothing).", "",
              "![sequence lengths](sequence_lengths.png)", "",
              "Longest pairs:", ""]
    lines += markdown.table(["tokens", "split", "#", "prompt", "chosen scored", "rejected scored", "last user message"],
                       [[x["tokens"], x["split"], x["index"], x["prompt_tokens"], x["chosen_scored"],
                         x["rejected_scored"], x["last_user_message"]] for x in tr["longest"]])
    return "\n".join(lines) + "\n"


def report_data(input_path, tokenizer, output_dir, max_length: int = DEFAULT_MAX_LENGTH,
                mask_mode: str = "minimind", tokenizer_name: str = "") -> dict:
    """Write `report.md`, `report.json` and the PNGs it embeds into `output_dir`; returns report.json's dict."""
    input_path, out = Path(input_path).expanduser(), Path(output_dir)
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}", code="missing_path")
    if max_length < 1:
        raise UserError(f"--max-length must be positive, got {max_length}")
    check_mask_mode(mask_mode, user_facing=True)
    check_tokenizer(tokenizer, mask_mode=mask_mode)
    fmt, splits, rejects, convert_stats = _load_for_report(input_path, tokenizer)
    usable = sum(len(v) for v in splits.values())
    if not usable:
        raise UserError(f"no usable preference pair in {input_path} ({len(rejects)} lines rejected)", code="bad_data")
    analysis = analyse_records(splits, tokenizer, max_length, mask_mode)
    per_pair = analysis.pop("_per_pair")
    report = {
        "input": str(input_path), "format": fmt, "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
        "mask_mode": mask_mode,
        "counts": {"records_read": usable + len(rejects), "usable": usable, "rejected": len(rejects),
                   "by_split": {k: len(v) for k, v in splits.items()}},
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejects).most_common()),
        **analysis,
    }
    if convert_stats.get("records_read"):
        report["counts"]["records_read"] = convert_stats["records_read"]
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [p.name for p in _plot_data_report(per_pair, report["turns_per_conversation"], max_length, out)]
    write_text_atomic(out / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    write_text_atomic(out / "report.md", _report_markdown(report))
    return report


def format_data_report(report: dict, out: Path) -> str:
    """What `minidpo report-data` prints: the report's headline numbers and the files written."""
    c, lb, tr = report["counts"], report["length_bias"], report["truncation"]
    tl = report["token_lengths"]
    lines = [f"{c['usable']:,} usable pairs ({', '.join(f'{k} {v:,}' for k, v in c['by_split'].items())}), "
             f"{c['rejected']:,} rejected lines"]
    lines += [f"  rejected {k}: {v:,}" for k, v in report["rejected_by_reason"].items()]
    for k, s in tl.items():
        lines.append(f"  tokens {k}: mean {s['mean']} p50 {s['p50']} p90 {s['p90']} max {s['max']}")
    lines.append(f"  chosen longer in {lb['share_chosen_longer']:.0%} of pairs, mean length ratio "
                 f"{lb['mean_length_ratio']:.2f}: {lb['advice']}")
    lines.append(f"  {tr['longer_than_max_length']:,} pairs longer than max_length {tr['max_length']} "
                 f"({tr['nothing_left_to_score']:,} with nothing left to score, "
                 f"{tr['identical_after_truncation']:,} identical after truncation); "
                 f"{report['duplicates']['exact_duplicate_pairs']:,} exact duplicates")
    lines.append(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots")
    return "\n".join(lines)
