"""Preference records for tests: builders, one bad line of every kind, and Hypothesis strategies of valid records."""

from __future__ import annotations

import json

from hypothesis import strategies as st


def to_trl(record: dict) -> dict:
    """A MiniMind record as a TRL conversational record, without minidpo's validation."""
    return {"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}


def msg(role, content):
    return {"role": role, "content": content}


def pair(prompt="Hi", good="Hello!", bad="Go away.", system=None):
    head = ([msg("system", system)] if system else []) + [msg("user", prompt)]
    return {"chosen": head + [msg("assistant", good)], "rejected": head + [msg("assistant", bad)]}


def line(obj) -> bytes:
    """A record as one JSONL line (UTF-8, non-ASCII kept)."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def bad_input_lines():
    """(raw line, expected reason or None for good) — one of every bad kind the issue lists, plus blanks."""
    good = [pair(f"Question {i} 你好 🚀", f"Answer {i}\n```py\nprint({i})\n```", f"Nope {i}") for i in range(6)]
    good.append({"chosen": [msg("system", "Sys"), msg("user", "a"), msg("assistant", "b"), msg("user", "c"),
                            msg("assistant", "d")],
                 "rejected": [msg("system", "Sys"), msg("user", "a"), msg("assistant", "b"), msg("user", "c"),
                              msg("assistant", "e")]})
    return [
        (line(good[0]), None),
        (b'{"chosen": [', "invalid_json"),
        (b"[" * 100000, "invalid_json"),
        (b"", "blank"),
        (b"[1, 2, 3]", "not_an_object"),
        (line(good[1]), None),
        (b"42", "not_an_object"),
        (line({"chosen": good[2]["chosen"]}), "missing_key"),
        (b"   ", "blank"),
        (line({"chosen": "text", "rejected": "text"}), "bad_type"),
        (line(good[2]), None),
        (line(dict(pair(), chosen=[msg("bot", "Hi"), msg("assistant", "x")])), "bad_role"),
        (line(dict(pair(), chosen=[msg("user", ["Hi"]), msg("assistant", "x")])), "bad_content"),
        (line(dict(pair(), chosen=[msg("user", "Hi"), msg("assistant", "  ")])), "bad_content"),
        (line(good[3]), None),
        (line({"chosen": pair("A")["chosen"], "rejected": pair("B")["rejected"]}), "prompt_mismatch"),
        (line({"chosen": [msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
               "rejected": [msg("user", "a"), msg("assistant", "d"), msg("user", "c")]}), "last_not_assistant"),
        (line(pair(good="same", bad="same")), "identical_answers"),
        (line(pair(good="Sure.<|im_end|>\n<|im_start|>user\nmore")), "special_token_in_content"),
        (line(good[4]), None),
        (line(pair(good="caf\u00e9"))[:-10] + b"\xff\xfe" + line(pair())[-10:], "invalid_utf8"),
        (line(good[5]), None),
        (line(good[6]), None),
        (b"", "blank"),
    ]


def write_input(path, lines, bom=True, crlf=True):
    eol = b"\r\n" if crlf else b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + eol.join(raw for raw, _ in lines) + eol)


def _no_special_token(text: str) -> bool:
    from minidpo.records import find_special_token

    return find_special_token(text) is None


_text = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from("你好世界🚀😀\n"), min_size=1,
                max_size=40).filter(lambda t: t.strip() and _no_special_token(t))


@st.composite
def minimind_records(draw):
    """Valid MiniMind records: optional system message, 0-3 earlier turns, a user message, two distinct answers."""
    msgs = [msg("system", draw(_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 3))):
        msgs += [msg("user", draw(_text)), msg("assistant", draw(_text))]
    msgs.append(msg("user", draw(_text)))
    good, bad = draw(st.lists(_text, min_size=2, max_size=2, unique=True))
    return {"chosen": msgs + [msg("assistant", good)], "rejected": msgs + [msg("assistant", bad)]}
