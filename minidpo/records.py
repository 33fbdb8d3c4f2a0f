"""One preference record: validation of MiniMind and TRL records, and reading them line by line.

A MiniMind line is `{"chosen": [messages], "rejected": [messages]}` where both lists share every message but
the final assistant answer. TRL wants `{"prompt": [messages], "chosen": [answer], "rejected": [answer]}`.
`to_trl_record` turns the first into the second and `check_trl_record` validates the second with the same rules;
every bad record raises `RecordError` with a machine-readable `code`, so nothing is dropped silently.
"""

import base64
import hashlib
import json
import re

from minidpo.errors import RecordError

ROLES = ("system", "user", "assistant")
# ChatML markers: MiniMind's template is built from them, and a literal copy inside a content would be
# tokenized as a real marker and shift the assistant spans the loss mask is built from.
DEFAULT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON "\ud800" escapes decode to strings UTF-8 cannot encode


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
# Lines of a JSONL file


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


def line_format(obj) -> str:
    """"trl" for a record with a `prompt`, else "minimind": what a line is, whatever its neighbours are."""
    return "trl" if isinstance(obj, dict) and "prompt" in obj else "minimind"


def parse_line(raw: bytes, fmt: str = "auto", specials=DEFAULT_SPECIAL_TOKENS) -> dict:
    """One raw line -> a clean TRL record, or RecordError. `fmt` is "minimind", "trl" or "auto" (each line in the
    format it has, so a file mixing the two loses no line and every reject gets the reason of its own format)."""
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
    fmt = line_format(obj) if fmt == "auto" else fmt
    return check_trl_record(obj, specials) if fmt == "trl" else to_trl_record(obj, specials)


def reject_entry(n: int, raw: bytes, err: RecordError) -> dict:
    """One rejects.jsonl line: line number, reason (the error's code), message and the raw line."""
    entry = {"line": n, "reason": err.code, "message": err.message, "raw": raw.decode("utf-8", errors="replace")}
    if err.code == "invalid_utf8":
        entry["raw_base64"] = base64.b64encode(raw).decode("ascii")  # the only lossless copy of such a line
    return entry


def in_eval_split(line: bytes, seed: int, fraction: float) -> bool:
    """Deterministic split by a hash of the converted record: stable under reordering, blank lines or CRLF,
    and duplicates of one record always land on the same side (no train/eval leakage)."""
    h = hashlib.blake2b(line, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "big") < fraction * 2**64


def last_user_message(messages: list[dict]) -> str:
    """The content of the last user message of a conversation ("" when there is none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
