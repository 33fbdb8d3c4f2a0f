"""MiniMind dpo.jsonl -> TRL prompt/chosen/rejected records: validation, streaming conversion, loading.

A MiniMind line is `{"chosen": [messages], "rejected": [messages]}` where both lists share every message but
the final assistant answer. TRL wants `{"prompt": [messages], "chosen": [answer], "rejected": [answer]}`.
Every bad line gets a machine-readable reason (`RecordError.code`); nothing is dropped silently.
"""

import base64
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

from minidpo.cli import UserError
from minidpo.masking import MASK_MODES  # masking.py imports nothing heavy at module level

ROLES = ("system", "user", "assistant")
# ChatML markers: MiniMind's template is built from them, and a literal copy inside a content would be
# tokenized as a real marker and shift the assistant spans the loss mask is built from.
DEFAULT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON "\ud800" escapes decode to strings UTF-8 cannot encode
_MAX_WARNINGS = 100


class RecordError(ValueError):
    """A record that cannot be converted: `.code` is short and machine-readable, `.message` is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return f"{self.code}: {self.message}"


# ---------------------------------------------------------------------------------------------------------
# One record


def special_tokens(tokenizer=None) -> tuple:
    """The strings that must never appear inside a content: ChatML markers plus the tokenizer's specials."""
    found = list(DEFAULT_SPECIAL_TOKENS)
    if tokenizer is not None:
        found += list(getattr(tokenizer, "all_special_tokens", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        found += [str(t) for t in added if getattr(t, "special", False)]
    return tuple(dict.fromkeys(s for s in found if s))  # dedupe, keep order; "" would match everything


def find_special_token(text: str, specials=DEFAULT_SPECIAL_TOKENS):
    """The first special-token string found in `text`, or None."""
    for s in specials:
        if s in text:
            return s
    return None


def _clean_message(msg, where: str, specials) -> dict:
    if not isinstance(msg, dict):
        raise RecordError("bad_type", f"{where} must be an object with role and content, got {type(msg).__name__}")
    for key in ("role", "content"):
        if key not in msg:
            raise RecordError("missing_key", f"{where} has no {key!r}")
    role, content = msg["role"], msg["content"]
    if not isinstance(role, str) or role not in ROLES:
        raise RecordError("bad_role", f"{where} role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise RecordError("bad_content", f"{where} content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise RecordError("bad_content", f"{where} content is empty or whitespace only")
    if _SURROGATE.search(content):
        raise RecordError("bad_content", f"{where} content holds a lone UTF-16 surrogate (not valid text)")
    token = find_special_token(content, specials)
    if token is not None:
        raise RecordError("special_token_in_content", f"{where} content contains the special token {token!r}")
    return {"role": role, "content": content}  # drop extra keys so the output stays plain TRL


def _clean_conversation(record: dict, side: str, specials) -> list:
    if side not in record:
        raise RecordError("missing_key", f"record has no {side!r} key")
    msgs = record[side]
    if not isinstance(msgs, list):
        raise RecordError("bad_type", f"{side!r} must be a list of messages, got {type(msgs).__name__}")
    if not msgs:
        raise RecordError("empty_conversation", f"{side!r} has no messages")
    out = [_clean_message(m, f"{side}[{i}]", specials) for i, m in enumerate(msgs)]
    for i, m in enumerate(out[1:], 1):
        if m["role"] == "system":
            raise RecordError("bad_role", f"{side}[{i}] is a system message; system may only come first")
    if out[-1]["role"] != "assistant":
        raise RecordError("last_not_assistant", f"the last message of {side!r} is {out[-1]['role']!r}, not 'assistant'")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise RecordError("no_user_message", f"{side!r} has no user message before the final answer")
    return out


def to_trl_record(record: dict, specials=DEFAULT_SPECIAL_TOKENS) -> dict:
    """MiniMind `{"chosen": [...], "rejected": [...]}` -> TRL `{"prompt", "chosen", "rejected"}`, or RecordError.

    `specials` are the strings forbidden inside contents; pass `special_tokens(tokenizer)` to add a tokenizer's.
    """
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {_json_type(record)}")
    chosen = _clean_conversation(record, "chosen", specials)
    rejected = _clean_conversation(record, "rejected", specials)
    prompt = chosen[:-1]
    if prompt != rejected[:-1]:
        raise RecordError("prompt_mismatch", _mismatch_message(prompt, rejected[:-1]))
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RecordError("identical_answers", "chosen and rejected give the same final answer")
    return {"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def check_trl_record(record: dict, specials=DEFAULT_SPECIAL_TOKENS) -> dict:
    """Validate a TRL conversational record with the same rules as `to_trl_record`; returns it cleaned."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {_json_type(record)}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise RecordError("missing_key", f"record has no {key!r} key")
        if not isinstance(record[key], list):
            raise RecordError("bad_type", f"{key!r} must be a list of messages (conversational format), "
                                          f"got {_json_type(record[key])}")
    for key in ("chosen", "rejected"):
        if len(record[key]) != 1:
            raise RecordError("bad_type", f"{key!r} must hold exactly one assistant message, got {len(record[key])}")
    # Rebuild the MiniMind shape so both formats go through exactly one set of checks.
    return to_trl_record({"chosen": record["prompt"] + record["chosen"],
                          "rejected": record["prompt"] + record["rejected"]}, specials)


def _mismatch_message(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"chosen has {len(a)} prompt messages but rejected has {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"prompt message {i} differs between chosen and rejected"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# ---------------------------------------------------------------------------------------------------------
# Lines


def iter_jsonl_lines(path):
    """Yield `(line_number, raw_bytes)` for every physical line (1-based), EOL and a leading BOM removed.

    Binary on purpose: each line is decoded by `parse_line`, so invalid UTF-8 rejects one line, not the file.
    Blank lines are yielded too (as whitespace or b""); callers skip them without counting them as records.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield n, raw.rstrip(b"\n").rstrip(b"\r")


def parse_line(raw: bytes, fmt: str = "minimind", specials=DEFAULT_SPECIAL_TOKENS) -> dict:
    """One raw line -> a clean TRL record, or RecordError. `fmt` is "minimind" or "trl"."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise RecordError("invalid_json", "JSON nested too deeply to parse") from None
    return check_trl_record(obj, specials) if fmt == "trl" else to_trl_record(obj, specials)


def _reject_entry(n: int, raw: bytes, err: RecordError) -> dict:
    entry = {"line": n, "reason": err.code, "message": err.message, "raw": raw.decode("utf-8", errors="replace")}
    if err.code == "invalid_utf8":
        entry["raw_base64"] = base64.b64encode(raw).decode("ascii")  # the only lossless copy of such a line
    return entry


def _to_eval(line: bytes, seed: int, fraction: float) -> bool:
    """Deterministic split by a hash of the converted record: stable under reordering, blank lines or CRLF,
    and duplicates of one record always land on the same side (no train/eval leakage)."""
    h = hashlib.blake2b(line, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "big") < fraction * 2**64


def split_records(records: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval) with the same rule `convert --eval-fraction` applies to its output lines."""
    train, evals = [], []
    for r in records:
        (evals if _to_eval(json.dumps(r, ensure_ascii=False).encode("utf-8"), seed, fraction) else train).append(r)
    return train, evals


# ---------------------------------------------------------------------------------------------------------
# Tokenizer checks (the masking layer decides what is scored)


def load_tokenizer(path):
    """A local tokenizer directory -> tokenizer, or UserError. Never runs remote code, never downloads."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else e!r}")


def _pair_checker(tokenizer, max_length, mask_mode):
    """`check(record) -> (encoded, issues)` through `minidpo.masking.diagnose_pair`, raising RecordError for
    a fatal issue. UserError, before any record is read, when the tokenizer cannot be used at all."""
    from jinja2 import TemplateError

    from minidpo.masking import MaskingError, diagnose_pair

    def check(record):
        try:
            encoded, issues = diagnose_pair(record, tokenizer, max_length=max_length, mask_mode=mask_mode)
        except MaskingError as e:
            raise RecordError(e.code, e.message) from None
        except TemplateError as e:  # templates may refuse a record, e.g. Llama's "roles must alternate"
            raise RecordError("template_error", f"the chat template refused this record: {e}") from None
        fatal = next((i for i in issues if i.fatal), None)
        if fatal is not None:
            raise RecordError(fatal.code, fatal.message)
        return encoded, issues

    probe = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "assistant", "content": "Go away"}]}
    try:
        diagnose_pair(probe, tokenizer, max_length=max_length, mask_mode=mask_mode)
    except MaskingError as e:
        raise UserError(f"this tokenizer cannot be used ({e.code}): {e.message}") from None
    return check


class _LengthStats:
    """Exact percentiles in O(distinct lengths) memory, so multi-GB inputs stay streaming."""

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


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# Files


class _AtomicOutputs:
    """Files written under temporary names in DIR and renamed into place only when the whole run succeeds,
    so a crash or --strict stop never leaves a half-written file that looks complete."""

    def __init__(self, out_dir: Path, names):
        self.dir, self.names = out_dir, list(names)
        self.tmp = {n: out_dir / f".{n}.tmp-{os.getpid()}" for n in self.names}
        self.files = {}

    def __enter__(self):
        self.files = {n: open(p, "w", encoding="utf-8", newline="\n") for n, p in self.tmp.items()}
        return self.files

    def __exit__(self, exc_type, exc, tb):
        for f in self.files.values():
            f.close()
        if exc_type is None:
            for n, p in self.tmp.items():
                os.replace(p, self.dir / n)
        else:
            for p in self.tmp.values():
                p.unlink(missing_ok=True)
        return False


def _check_input(path: Path):
    if not path.exists():
        raise UserError(f"input file not found: {path}")
    if path.is_dir():
        raise UserError(f"input is a directory, not a .jsonl file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"input file is not readable: {path}")


def _prepare_output_dir(path: Path):
    if path.exists() and not path.is_dir():
        raise UserError(f"--output must be a directory, but {path} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {path}: {e.strerror}") from None


def convert_file(input_path, output_dir, tokenizer=None, max_length=None, mask_mode="minimind",
                 eval_fraction=0.0, seed=0, strict=False, progress=True) -> dict:
    """Stream a MiniMind dpo.jsonl into DIR/{train,eval,rejects}.jsonl + DIR/stats.json; returns the stats.

    With a tokenizer, each pair also goes through `minidpo.masking.diagnose_pair`: fatal issues (nothing left
    to score after truncation, ...) reject the record, others are counted as warnings.
    Raises UserError for an unusable input/tokenizer, when nothing converts, and on the first bad record
    when `strict`.
    """
    input_path, output_dir = Path(input_path), Path(output_dir)
    _check_input(input_path)
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if max_length is not None and (tokenizer is None or max_length < 1):
        raise UserError("--max-length needs --tokenizer and a positive value")
    if mask_mode not in MASK_MODES:
        raise UserError(f"--mask-mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    specials = special_tokens(tokenizer)
    check = _pair_checker(tokenizer, max_length, mask_mode) if tokenizer is not None else None
    _prepare_output_dir(output_dir)

    stats = {"input": str(input_path), "output_dir": str(output_dir), "lines_read": 0, "records_read": 0,
             "converted": 0, "train": 0, "eval": 0, "rejected": 0, "rejected_by_reason": Counter(),
             "warnings_by_code": Counter(), "warnings": []}
    lengths = {k: _LengthStats() for k in ("prompt", "chosen", "rejected", "chosen_scored", "rejected_scored")}
    names = ["train.jsonl", "rejects.jsonl"] + (["eval.jsonl"] if eval_fraction > 0 else [])

    from tqdm import tqdm

    bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
               disable=None if progress else True)  # None: off when stderr is not a terminal
    try:
        with _AtomicOutputs(output_dir, names) as out:
            for n, raw in iter_jsonl_lines(input_path):
                stats["lines_read"] = n
                bar.update(len(raw) + 1)
                if not raw.strip():
                    continue
                stats["records_read"] += 1
                try:
                    record = parse_line(raw, "minimind", specials)
                    encoded, issues = check(record) if check is not None else (None, [])
                except RecordError as err:
                    if strict:
                        raise UserError(f"{input_path}:{n}: {err.code}: {err.message} (--strict)") from None
                    stats["rejected"] += 1
                    stats["rejected_by_reason"][err.code] += 1
                    out["rejects.jsonl"].write(json.dumps(_reject_entry(n, raw, err), ensure_ascii=False) + "\n")
                    continue
                for issue in issues:
                    stats["warnings_by_code"][issue.code] += 1
                    if len(stats["warnings"]) < _MAX_WARNINGS:
                        stats["warnings"].append({"line": n, "code": issue.code, "message": issue.message})
                if check is not None:
                    _add_lengths(lengths, encoded)
                line = json.dumps(record, ensure_ascii=False)
                split = "eval" if eval_fraction > 0 and _to_eval(line.encode("utf-8"), seed, eval_fraction) else "train"
                out[f"{split}.jsonl"].write(line + "\n")
                stats[split] += 1
                stats["converted"] += 1
    finally:
        bar.close()
    if eval_fraction == 0:
        (output_dir / "eval.jsonl").unlink(missing_ok=True)  # a stale split from an earlier run would be loaded
    assert stats["converted"] + stats["rejected"] == stats["records_read"], stats
    stats = _write_stats(output_dir, stats, lengths, check is not None)
    if not stats["records_read"]:
        raise UserError(f"no records in {input_path} (the file is empty or holds only blank lines)")
    if not stats["converted"]:
        raise UserError(f"no record converted: all {stats['rejected']} rejected "
                        f"({_reason_list(stats['rejected_by_reason'])}); see {output_dir / 'rejects.jsonl'}")
    return stats


def _add_lengths(lengths, enc):
    c, r = enc["chosen_input_ids"], enc["rejected_input_ids"]
    lengths["prompt"].add(_common_prefix(c, r))
    lengths["chosen"].add(len(c))
    lengths["rejected"].add(len(r))
    lengths["chosen_scored"].add(sum(enc["chosen_loss_mask"]))
    lengths["rejected_scored"].add(sum(enc["rejected_loss_mask"]))


def _write_stats(output_dir: Path, stats: dict, lengths: dict, tokenized: bool) -> dict:
    stats = dict(stats, rejected_by_reason=dict(stats["rejected_by_reason"].most_common()),
                 warnings_by_code=dict(stats["warnings_by_code"].most_common()))
    if tokenized:
        # "prompt" is the shared token prefix of the two rendered sides (the prompt plus any common answer start)
        stats["token_lengths"] = {k: v.summary() for k, v in lengths.items()}
    tmp = output_dir / f".stats.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / "stats.json")  # last, so a stats.json means the outputs beside it are whole
    return stats


def _reason_list(counts) -> str:
    return ", ".join(f"{code} {n}" for code, n in Counter(counts).most_common())


# ---------------------------------------------------------------------------------------------------------
# Loading for training


def detect_format(path) -> str:
    """"convert-dir" (output of `minidpo convert`), "trl" (prompt/chosen/rejected lines) or "minimind"."""
    path = Path(path)
    if path.is_dir():
        if (path / "train.jsonl").is_file():
            return "convert-dir"
        raise UserError(f"{path} is a directory without train.jsonl (expected the output of `minidpo convert`)")
    _check_input(path)
    for n, raw in iter_jsonl_lines(path):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # one bad line should not hide the format; it becomes a reject later
        if isinstance(obj, dict) and "prompt" in obj:
            return "trl"
        if isinstance(obj, dict) and ("chosen" in obj or "rejected" in obj):
            return "minimind"
        if n >= 1000:
            break
    raise UserError(f"cannot tell the format of {path}: expected JSON lines with chosen/rejected (MiniMind) "
                    "or prompt/chosen/rejected (TRL)")


def load_trl_records(path, split: str = "train", tokenizer=None):
    """Read any supported input into memory as clean TRL records: `(records, rejects)`.

    `rejects` are dicts like rejects.jsonl lines. A convert directory gives its `split` ("train" or "eval",
    the latter empty when it was written without --eval-fraction); a single file is all "train".
    """
    fmt = detect_format(path)
    path = Path(path)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if fmt == "convert-dir":
        path = path / f"{split}.jsonl"
        if not path.is_file():
            return [], []
    elif split == "eval":
        return [], []
    specials = special_tokens(tokenizer)
    records, rejects = [], []
    for n, raw in iter_jsonl_lines(path):
        if not raw.strip():
            continue
        try:
            records.append(parse_line(raw, "minimind" if fmt == "minimind" else "trl", specials))
        except RecordError as err:
            rejects.append(_reject_entry(n, raw, err))
    return records, rejects


# ---------------------------------------------------------------------------------------------------------
# CLI: `minidpo convert`


def add_convert_arguments(parser):
    parser.add_argument("input", help="MiniMind dpo.jsonl (one {chosen, rejected} object a line)")
    parser.add_argument("--output", required=True, help="directory for train/eval/rejects.jsonl and stats.json")
    parser.add_argument("--tokenizer", help="local tokenizer directory: also check masking and report token lengths")
    parser.add_argument("--max-length", type=int, help="truncate like training does (needs --tokenizer); "
                                                       "records left with nothing to score are rejected")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default="minimind",
                        help="which assistant tokens are scored (default: minimind, every assistant turn)")
    parser.add_argument("--eval-fraction", type=float, default=0.0, help="share of records for eval.jsonl (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic train/eval split")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def convert_command(args) -> int:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    stats = convert_file(args.input, args.output, tokenizer=tokenizer, max_length=args.max_length,
                         mask_mode=args.mask_mode, eval_fraction=args.eval_fraction, seed=args.seed,
                         strict=args.strict, progress=not args.no_progress)
    print(format_summary(stats))
    return 0


def format_summary(stats: dict) -> str:
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
    return "\n".join(lines)
