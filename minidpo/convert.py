"""`minidpo convert`'s work: stream a MiniMind dpo.jsonl into TRL records on disk, every line accounted for.

Output directory: train.jsonl (and eval.jsonl with an eval fraction), rejects.jsonl (each bad line with its line
number and reason) and stats.json (counts that add up, and token lengths when a tokenizer is given). Files are
written under temporary names and renamed into place only when the whole run succeeds; stats.json comes last, so
its presence means the files beside it are whole.
"""

import contextlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

from minidpo.errors import RecordError, UserError
from minidpo.files import atomic_path, check_input_file, remove_orphans, write_error
from minidpo.masking import check_mask_mode, check_tokenizer, common_prefix, encode_pair_with_issues
from minidpo.records import in_eval_split, iter_jsonl_lines, parse_line, reject_entry, special_tokens

_MAX_WARNINGS = 100  # warnings kept with their line numbers in stats.json; all are counted
OUTPUT_FILES = ("train.jsonl", "eval.jsonl", "rejects.jsonl", "stats.json")


class LengthStats:
    """Min, mean, p50/p90/p99 (nearest rank) and max of token lengths, exact, in O(distinct lengths) memory, so
    multi-GB inputs stay streaming."""

    def __init__(self):
        self.counts = Counter()

    def add(self, n: int):
        self.counts[n] += 1

    def summary(self) -> dict:
        total = sum(self.counts.values())
        if not total:
            return {}
        items = sorted(self.counts.items())
        out = {"min": items[0][0], "mean": round(sum(k * c for k, c in items) / total, 2)}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            rank, seen = max(1, math.ceil(total * q)), 0  # nearest-rank percentile
            for k, c in items:
                seen += c
                if seen >= rank:
                    out[name] = k
                    break
        out["max"] = items[-1][0]
        return out


def _pair_checker(tokenizer, max_length, mask_mode):
    """`check(record) -> (encoded, issues)` through `minidpo.masking.encode_pair_with_issues`, raising RecordError for
    a fatal issue. UserError, before any record is read, when the tokenizer cannot be used at all."""
    from jinja2 import TemplateError

    check_tokenizer(tokenizer, max_length=max_length, mask_mode=mask_mode)

    def check(record):
        try:
            encoded, issues = encode_pair_with_issues(record, tokenizer, max_length=max_length, mask_mode=mask_mode)
        except TemplateError as e:  # templates may refuse a record, e.g. Llama's "roles must alternate"
            raise RecordError("template_error", f"the chat template refused this record: {e}") from None
        fatal = next((i for i in issues if i.fatal), None)
        if fatal is not None:
            raise RecordError(fatal.code, fatal.message)
        return encoded, issues

    return check


@contextlib.contextmanager
def _outputs(out_dir: Path, names):
    """Open files `out_dir/name` for writing, each renamed into place only when the whole block succeeds, so a
    crash or --strict stop never leaves a half-written file that looks complete."""
    with contextlib.ExitStack() as stack:
        tmp = {n: stack.enter_context(atomic_path(out_dir / n)) for n in names}
        yield {n: stack.enter_context(open(p, "w", encoding="utf-8", newline="\n")) for n, p in tmp.items()}


def _prepare_output_dir(input_path: Path, path: Path, overwrite: bool) -> bool:
    """Create `path` (True when this call created it). Refuse, before anything is written, an --output whose files
    would replace the input itself (whatever --overwrite says: the only copy of the data would be gone) or files
    already there unless `overwrite`."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--output must be a directory, but {path} is a file", code="output_dir")
    targets = [path / name for name in OUTPUT_FILES]
    if any(t.exists() and t.samefile(input_path) for t in targets):
        raise UserError(f"--output {path} would overwrite the input {input_path} itself: choose another --output",
                        code="output_dir")
    existing = [t.name for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"--output {path} already holds {', '.join(existing)}: pass --overwrite to replace them, or "
                        "choose another --output", code="output_dir")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {path}: {e.strerror}", code="output_dir") from None
    remove_orphans(path)  # temporaries of a convert killed mid-write
    return created


def convert_file(input_path, output_dir, tokenizer=None, max_length=None, mask_mode="minimind",
                 eval_fraction=0.0, seed=0, strict=False, progress=True, overwrite=False) -> dict:
    """Stream a MiniMind dpo.jsonl into DIR/{train,eval,rejects}.jsonl + DIR/stats.json; returns the stats.

    With a tokenizer, each pair also goes through `minidpo.masking.encode_pair_with_issues`: fatal issues (nothing left
    to score after truncation, ...) reject the record, others are counted as warnings.
    Raises UserError for an unusable input/tokenizer, an output that holds files already (unless `overwrite`) or
    is the input itself, a write that fails (disk full: nothing written is left), when nothing converts, and on
    the first bad record when `strict`.
    """
    input_path, output_dir = Path(input_path), Path(output_dir)
    check_input_file(input_path)
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if max_length is not None and (tokenizer is None or max_length < 1):
        raise UserError("--max-length needs --tokenizer and a positive value")
    check_mask_mode(mask_mode, user_facing=True)
    specials = special_tokens(tokenizer)
    check = _pair_checker(tokenizer, max_length, mask_mode) if tokenizer is not None else None
    created = _prepare_output_dir(input_path, output_dir, overwrite)
    try:
        stats = _convert(input_path, output_dir, check, specials, eval_fraction, seed, strict, progress)
    except OSError as e:
        # disk full, a read-only or vanished folder: the temporaries are gone (atomic_path) and nothing was renamed
        # into place; a folder this call created goes too
        if created:
            with contextlib.suppress(OSError):
                output_dir.rmdir()
        raise write_error("the converted pairs", output_dir, e, "choose another --output") \
            from None
    if not stats["records_read"]:
        raise UserError(f"no records in {input_path} (the file is empty or holds only blank lines)", code="bad_data")
    if not stats["converted"]:
        raise UserError(f"no record converted: all {stats['rejected']} rejected "
                        f"({_reason_list(stats['rejected_by_reason'])}); see {output_dir / 'rejects.jsonl'}",
                        code="bad_data")
    return stats


def _convert(input_path: Path, output_dir: Path, check, specials, eval_fraction: float, seed: int, strict: bool,
             progress: bool) -> dict:
    """The conversion itself, into an output directory that exists; returns the stats written to stats.json."""

    stats = {"input": str(input_path), "output_dir": str(output_dir), "lines_read": 0, "records_read": 0,
             "converted": 0, "train": 0, "eval": 0, "rejected": 0, "rejected_by_reason": Counter(),
             "warnings_by_code": Counter(), "warnings": []}
    lengths = {k: LengthStats() for k in ("prompt", "chosen", "rejected", "chosen_scored", "rejected_scored")}
    # stats.json first: the outputs are renamed into place in reverse order, so it comes last and vouches for the
    # files beside it; a write that fails (disk full) leaves every earlier file as it was
    names = ["stats.json", "train.jsonl", "rejects.jsonl"] + (["eval.jsonl"] if eval_fraction > 0 else [])

    from tqdm import tqdm

    bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
               disable=None if progress else True)  # None: off when stderr is not a terminal
    try:
        with _outputs(output_dir, names) as out:
            for n, raw in iter_jsonl_lines(input_path):
                stats["lines_read"] = n
                bar.update(len(raw) + 1)
                if not raw.strip():
                    continue
                stats["records_read"] += 1
                try:
                    record = parse_line(raw, "auto", specials)
                    encoded, issues = check(record) if check is not None else (None, [])
                except RecordError as err:
                    if strict:
                        raise UserError(f"{input_path}:{n}: {err.code}: {err.message} (--strict)",
                                        code="bad_data") from None
                    stats["rejected"] += 1
                    stats["rejected_by_reason"][err.code] += 1
                    out["rejects.jsonl"].write(json.dumps(reject_entry(n, raw, err), ensure_ascii=False) + "\n")
                    continue
                for issue in issues:
                    stats["warnings_by_code"][issue.code] += 1
                    if len(stats["warnings"]) < _MAX_WARNINGS:
                        stats["warnings"].append({"line": n, "code": issue.code, "message": issue.message})
                if check is not None:
                    _add_lengths(lengths, encoded)
                line = json.dumps(record, ensure_ascii=False)
                split = ("eval" if eval_fraction > 0 and in_eval_split(line.encode("utf-8"), seed, eval_fraction)
                         else "train")
                out[f"{split}.jsonl"].write(line + "\n")
                stats[split] += 1
                stats["converted"] += 1
            assert stats["converted"] + stats["rejected"] == stats["records_read"], stats
            stats = _final_stats(stats, lengths, check is not None, eval_fraction)
            out["stats.json"].write(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
    finally:
        bar.close()
    if eval_fraction == 0:
        (output_dir / "eval.jsonl").unlink(missing_ok=True)  # a stale split from an earlier run would be loaded
    if not stats["converted"]:
        # an empty train.jsonl would look like output; rejects.jsonl and stats.json stay to explain why
        for name in ("train.jsonl", "eval.jsonl"):
            (output_dir / name).unlink(missing_ok=True)
    return stats


def _add_lengths(lengths, enc):
    c, r = enc["chosen_input_ids"], enc["rejected_input_ids"]
    lengths["prompt"].add(common_prefix(c, r))
    lengths["chosen"].add(len(c))
    lengths["rejected"].add(len(r))
    lengths["chosen_scored"].add(sum(enc["chosen_loss_mask"]))
    lengths["rejected_scored"].add(sum(enc["rejected_loss_mask"]))


def _final_stats(stats: dict, lengths: dict, tokenized: bool, eval_fraction: float) -> dict:
    """stats.json's content: counters as plain dicts, most common first, token lengths, and the warning for a
    held-out split the user asked for that came out empty (training would run without any evaluation)."""
    if eval_fraction > 0 and stats["converted"] and not stats["eval"]:
        stats["warnings_by_code"]["empty_eval_split"] += 1
        stats["warnings"].append({"line": None, "code": "empty_eval_split", "message": (
            f"--eval-fraction {eval_fraction} of {stats['converted']} pairs held out none: eval.jsonl is empty; "
            f"raise it to at least {1 / stats['converted']:.2g}")})
    stats = dict(stats, rejected_by_reason=dict(stats["rejected_by_reason"].most_common()),
                 warnings_by_code=dict(stats["warnings_by_code"].most_common()))
    if tokenized:
        # "prompt" is the shared token prefix of the two rendered sides (the prompt plus any common answer start)
        stats["token_lengths"] = {k: v.summary() for k, v in lengths.items()}
    return stats


def _reason_list(counts) -> str:
    return ", ".join(f"{code} {n}" for code, n in Counter(counts).most_common())


def format_summary(stats: dict) -> str:
    """What `minidpo convert` prints: counts, reject reasons, warnings, token lengths and the files written."""
    out = Path(stats["output_dir"])
    lines = [f"converted {stats['converted']:,} of {stats['records_read']:,} records "
             f"(train {stats['train']:,}, eval {stats['eval']:,}); rejected {stats['rejected']:,}"]
    lines += [f"  rejected {code}: {n:,}" for code, n in stats["rejected_by_reason"].items()]
    lines += [f"  warning {code}: {n:,}" for code, n in stats["warnings_by_code"].items()]
    for key, s in stats.get("token_lengths", {}).items():
        if s:
            lines.append(f"  tokens {key}: min {s['min']} mean {s['mean']} p50 {s['p50']} p90 {s['p90']} "
                         f"p99 {s['p99']} max {s['max']}")
    files = ["train.jsonl"] + (["eval.jsonl"] if stats["eval"] or (out / "eval.jsonl").exists() else [])
    lines.append("wrote " + ", ".join(str(out / f) for f in files + ["rejects.jsonl", "stats.json"]))
    lines += [f"WARNING: {w['message']}" for w in stats["warnings"] if w["line"] is None]  # about the whole file
    return "\n".join(lines)
