"""Reading preference data for training, evaluation and reports: any supported input as clean TRL records.

Supported inputs: a MiniMind dpo.jsonl, a TRL conversational jsonl (prompt/chosen/rejected message lists), or a
directory written by `minidpo convert` (its train.jsonl / eval.jsonl). Lines that fail validation come back as
rejects (rejects.jsonl entries), never dropped.
"""

import json
from pathlib import Path

from minidpo.errors import RecordError, UserError
from minidpo.files import check_input_file
from minidpo.records import in_eval_split, iter_jsonl_lines, line_format, parse_line, reject_entry, special_tokens

EVAL_PAIRS = "eval_pairs.jsonl"  # in a training output_dir: the pairs the run held out (what `minidpo eval` scores)


def detect_format(path) -> str:
    """"convert-dir" (output of `minidpo convert`), or what a file's lines are: "trl" (prompt/chosen/rejected),
    "minimind" or "mixed" (both, each line read in its own format), judged on the first 1000 readable lines."""
    path = Path(path)
    if path.is_dir():
        if (path / "train.jsonl").is_file():
            return "convert-dir"
        raise UserError(f"{path} is a directory without train.jsonl (expected the output of `minidpo convert`)",
                        code="bad_data")
    check_input_file(path)
    seen = set()
    for n, raw in iter_jsonl_lines(path):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue  # one bad line should not hide the format; it becomes a reject later
        if isinstance(obj, dict) and {"prompt", "chosen", "rejected"} & set(obj):
            seen.add(line_format(obj))
        if len(seen) == 2 or n >= 1000:
            break
    if not seen:
        raise UserError(f"cannot tell the format of {path}: expected JSON lines with chosen/rejected (MiniMind) "
                        "or prompt/chosen/rejected (TRL)", code="bad_data")
    return "mixed" if len(seen) == 2 else seen.pop()


def load_trl_records(path, split: str = "train", tokenizer=None, fmt: str | None = None):
    """Read any supported input into memory as clean TRL records: `(records, rejects)`.

    `rejects` are dicts like rejects.jsonl lines. A convert directory gives its `split` ("train" or "eval",
    the latter empty when it was written without --eval-fraction); a single file is all "train". `fmt` is
    `detect_format(path)` when the caller has it already.
    """
    path = split_path(path, split, fmt or detect_format(path))
    if path is None:
        return [], []
    records, rejects = [], []
    for record, reject in iter_records(path, tokenizer):
        if record is not None:
            records.append(record)
        else:
            rejects.append(reject)
    return records, rejects


def split_path(path, split: str, fmt: str):
    """The file holding `split` of a dataset in format `fmt`, or None when it has no such split (a single file is
    all "train"; a convert directory has eval.jsonl only when written with --eval-fraction)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = Path(path)
    if fmt == "convert-dir":
        path = path / f"{split}.jsonl"
        return path if path.is_file() else None
    return path if split == "train" else None


def iter_records(path, tokenizer=None):
    """`(record, None)` for each line of one jsonl file that validates, `(None, reject)` for each that does not, in
    file order; blank lines are skipped. `reject` is a rejects.jsonl entry (line number, reason, message, raw)."""
    specials = special_tokens(tokenizer)
    for n, raw in iter_jsonl_lines(path):
        if not raw.strip():
            continue
        try:
            yield parse_line(raw, "auto", specials), None
        except RecordError as err:
            yield None, reject_entry(n, raw, err)


def is_eval(record: dict, fraction: float, seed: int = 0) -> bool:
    """Whether `--eval-fraction` holds out this record (the rule `convert` applies to its output lines)."""
    return in_eval_split(json.dumps(record, ensure_ascii=False).encode("utf-8"), seed, fraction)
