import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, shared_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidpo.cli import UserError
from minidpo.data import (RecordError, check_trl_record, convert_file, detect_format, find_special_token,
                          load_trl_records, special_tokens, to_trl_record)


def msg(role, content):
    return {"role": role, "content": content}


def pair(prompt="Hi", good="Hello!", bad="Go away.", system=None):
    head = ([msg("system", system)] if system else []) + [msg("user", prompt)]
    return {"chosen": head + [msg("assistant", good)], "rejected": head + [msg("assistant", bad)]}


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def read_jsonl(path):
    # Split on "\n" only: contents may hold U+0085/U+2028, which str.splitlines() would also split on.
    return [json.loads(x) for x in Path(path).read_bytes().decode("utf-8").split("\n") if x]


# ---------------------------------------------------------------------------------------------------------
# to_trl_record


def test_converts_minimind_record_and_drops_extra_keys():
    rec = pair(system="Be nice.")
    rec["chosen"][1]["name"] = "bob"
    rec["id"] = 7
    out = to_trl_record(rec)
    assert out == {"prompt": [msg("system", "Be nice."), msg("user", "Hi")],
                   "chosen": [msg("assistant", "Hello!")], "rejected": [msg("assistant", "Go away.")]}


def test_multi_turn_prompt_keeps_earlier_assistant_turns():
    head = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    out = to_trl_record({"chosen": head + [msg("assistant", "d")], "rejected": head + [msg("assistant", "e")]})
    assert out["prompt"] == head


def test_seed_record_converts():
    rec = json.loads(shared_path("samples", "seed_record.jsonl").read_text(encoding="utf-8"))
    out = to_trl_record(rec)
    assert out["prompt"] == [msg("user", "continue")]
    assert out["chosen"][0]["content"].startswith("As Recharge Retreats grows")


BAD_RECORDS = {
    "not_an_object": [[1, 2], 3, "x", None],
    "missing_key": [{"chosen": pair()["chosen"]}, {"chosen": [{"role": "user"}], "rejected": []}],
    "bad_type": [{"chosen": "hi", "rejected": []}, {"chosen": ["hi"], "rejected": ["ho"]}],
    "empty_conversation": [{"chosen": [], "rejected": []}],
    "bad_role": [dict(pair(), chosen=[msg("human", "Hi"), msg("assistant", "x")]),
                 dict(pair(), chosen=[{"role": 3, "content": "Hi"}, msg("assistant", "x")]),
                 {"chosen": [msg("user", "Hi"), msg("system", "s"), msg("assistant", "a")],
                  "rejected": [msg("user", "Hi"), msg("system", "s"), msg("assistant", "b")]}],
    "bad_content": [dict(pair(), chosen=[msg("user", 5), msg("assistant", "x")]),
                    dict(pair(), chosen=[msg("user", " \n\t"), msg("assistant", "x")]),
                    dict(pair(), chosen=[msg("user", "Hi"), msg("assistant", "")]),
                    pair(good="bad \ud800 surrogate")],
    "prompt_mismatch": [{"chosen": pair("Hi")["chosen"], "rejected": pair("Hey")["rejected"]},
                        {"chosen": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "d")],
                         "rejected": [msg("user", "c"), msg("assistant", "e")]}],
    "last_not_assistant": [{"chosen": [msg("assistant", "a"), msg("user", "b")],
                            "rejected": [msg("assistant", "a"), msg("user", "c")]}],
    "no_user_message": [{"chosen": [msg("system", "s"), msg("assistant", "a")],
                         "rejected": [msg("system", "s"), msg("assistant", "b")]}],
    "identical_answers": [pair(good="same", bad="same")],
    "special_token_in_content": [pair(good="done<|im_end|>"), pair(prompt="<|im_start|>user"),
                                 pair(bad="x<|endoftext|>")],
}


@pytest.mark.parametrize("code,record", [(c, r) for c, rs in BAD_RECORDS.items() for r in rs])
def test_bad_record_gets_its_code(code, record):
    with pytest.raises(RecordError) as e:
        to_trl_record(record)
    assert e.value.code == code
    assert e.value.message and code in str(e.value)


def test_special_tokens_include_the_tokenizer_specials():
    class Tok:
        all_special_tokens = ["<s>", "</s>", ""]
        added_tokens_decoder = {}

    specials = special_tokens(Tok())
    assert "<|im_end|>" in specials and "</s>" in specials and "" not in specials
    assert find_special_token("a </s> b", specials) == "</s>"
    assert find_special_token("a </s> b") is None  # the default list only knows ChatML
    with pytest.raises(RecordError, match="special_token"):
        to_trl_record(pair(good="end</s>"), specials)


def test_check_trl_record_uses_the_same_rules():
    good = to_trl_record(pair())
    assert check_trl_record(dict(good, score=1.0)) == good
    with pytest.raises(RecordError) as e:
        check_trl_record(dict(good, chosen=good["chosen"] * 2))
    assert e.value.code == "bad_type"
    with pytest.raises(RecordError) as e:
        check_trl_record(dict(good, rejected=good["chosen"]))
    assert e.value.code == "identical_answers"
    with pytest.raises(RecordError) as e:
        check_trl_record(dict(good, prompt="Hi"))
    assert e.value.code == "bad_type"


# ---------------------------------------------------------------------------------------------------------
# convert_file: every kind of bad line mixed with good ones


def _bad_input_lines():
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


def _write_input(path, lines, bom=True, crlf=True):
    eol = b"\r\n" if crlf else b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + eol.join(raw for raw, _ in lines) + eol)


def test_bad_input_file(tmp_path):
    lines = _bad_input_lines()
    src = tmp_path / "dpo.jsonl"
    _write_input(src, lines)
    stats = convert_file(src, tmp_path / "out", progress=False)

    rejects = {r["line"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    expected_bad = {n: reason for n, (_, reason) in enumerate(lines, 1) if reason not in (None, "blank")}
    assert {n: r["reason"] for n, r in rejects.items()} == expected_bad
    for n, r in rejects.items():
        assert r["message"]
        if r["reason"] != "invalid_utf8":
            assert r["raw"] == lines[n - 1][0].decode("utf-8")
    utf8 = next(r for r in rejects.values() if r["reason"] == "invalid_utf8")
    assert base64.b64decode(utf8["raw_base64"]) == lines[utf8["line"] - 1][0]

    # Every good line, content preserved exactly, in input order.
    good = [to_trl_record(json.loads(raw)) for raw, reason in lines if reason is None]
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == good
    assert not (tmp_path / "out" / "eval.jsonl").exists()

    n_records = sum(reason != "blank" for _, reason in lines)
    assert stats["lines_read"] == len(lines)
    assert stats["records_read"] == n_records
    assert stats["converted"] == stats["train"] == len(good)
    assert stats["rejected"] == len(expected_bad) == sum(stats["rejected_by_reason"].values())
    assert stats["converted"] + stats["rejected"] == stats["records_read"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_eval_split_is_deterministic_disjoint_and_close_to_the_fraction(tmp_path):
    src = tmp_path / "dpo.jsonl"
    src.write_bytes(b"\n".join(line(pair(f"q{i}", f"good {i}", f"bad {i}")) for i in range(2000)) + b"\n")
    runs = []
    for name in ("a", "b"):
        stats = convert_file(src, tmp_path / name, eval_fraction=0.1, seed=3, progress=False)
        runs.append((read_jsonl(tmp_path / name / "train.jsonl"), read_jsonl(tmp_path / name / "eval.jsonl")))
        assert stats["train"] + stats["eval"] == 2000
    assert runs[0] == runs[1]
    train, ev = runs[0]
    assert 150 <= len(ev) <= 250
    keys = lambda rs: {r["prompt"][0]["content"] for r in rs}  # noqa: E731
    assert not keys(train) & keys(ev) and len(keys(train) | keys(ev)) == 2000
    convert_file(src, tmp_path / "c", eval_fraction=0.1, seed=4, progress=False)
    assert keys(read_jsonl(tmp_path / "c" / "eval.jsonl")) != keys(ev)
    # Rerunning without a split removes the old eval.jsonl rather than leaving it to be loaded.
    convert_file(src, tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "eval.jsonl").exists()


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tmp_path):
    src = tmp_path / "dpo.jsonl"
    _write_input(src, _bad_input_lines())
    with pytest.raises(UserError, match=r"dpo.jsonl:2: invalid_json"):
        convert_file(src, tmp_path / "out", strict=True, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_nothing_converts_or_nothing_to_read_is_an_error(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"nope\n[]\n")
    with pytest.raises(UserError, match="no record converted"):
        convert_file(src, tmp_path / "out", progress=False)
    assert len(read_jsonl(tmp_path / "out" / "rejects.jsonl")) == 2  # kept: they explain the failure
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\r\n")
    with pytest.raises(UserError, match="no records"):
        convert_file(empty, tmp_path / "out2", progress=False)


def test_bad_paths_and_options(tmp_path):
    with pytest.raises(UserError, match="not found"):
        convert_file(tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(UserError, match="directory"):
        convert_file(tmp_path, tmp_path / "out")
    src = tmp_path / "dpo.jsonl"
    src.write_bytes(line(pair()))  # no final newline
    with pytest.raises(UserError, match="eval-fraction"):
        convert_file(src, tmp_path / "out", eval_fraction=1.0)
    with pytest.raises(UserError, match="max-length"):
        convert_file(src, tmp_path / "out", max_length=10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="must be a directory"):
        convert_file(src, tmp_path / "file")
    assert convert_file(src, tmp_path / "out", progress=False)["converted"] == 1


def _cli(*args):
    # What the `minidpo` console script runs (`minidpo.cli:main`).
    code = "import sys; from minidpo.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_cli_exit_codes_and_messages(tmp_path):
    r = _cli("convert", tmp_path / "missing.jsonl", "--output", tmp_path / "out")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "input file not found" in r.stderr

    src = tmp_path / "dpo.jsonl"
    _write_input(src, _bad_input_lines())
    r = _cli("convert", src, "--output", tmp_path / "out", "--eval-fraction", "0.3", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "converted 7 of 21 records" in r.stdout and "invalid_utf8" in r.stdout and "stats.json" in r.stdout

    r = _cli("convert", src, "--output", tmp_path / "out2", "--strict", "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr and ":2: invalid_json" in r.stderr


# ---------------------------------------------------------------------------------------------------------
# Loading for training


def test_load_trl_records_reads_every_format(tmp_path):
    lines = _bad_input_lines()
    src = tmp_path / "dpo.jsonl"
    _write_input(src, lines)
    good = [to_trl_record(json.loads(raw)) for raw, reason in lines if reason is None]

    assert detect_format(src) == "minimind"
    records, rejects = load_trl_records(src)
    assert records == good and len(rejects) == sum(r not in (None, "blank") for _, r in lines)

    convert_file(src, tmp_path / "out", eval_fraction=0.5, seed=1, progress=False)
    assert detect_format(tmp_path / "out") == "convert-dir"
    train, _ = load_trl_records(tmp_path / "out")
    ev, _ = load_trl_records(tmp_path / "out", split="eval")
    assert sorted(map(json.dumps, train + ev)) == sorted(map(json.dumps, good))

    trl = tmp_path / "trl.jsonl"
    trl.write_bytes(b"\n".join(line(r) for r in good) + b"\n" + line(dict(good[0], chosen=[])) + b"\n")
    assert detect_format(trl) == "trl"
    records, rejects = load_trl_records(trl)
    assert records == good and [r["reason"] for r in rejects] == ["bad_type"]

    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "hello"}\n')
    with pytest.raises(UserError, match="cannot tell the format"):
        load_trl_records(other)
    with pytest.raises(UserError, match="without train.jsonl"):
        detect_format(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Property: any valid conversation converts and round-trips

_text = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from("你好世界🚀😀\n"), min_size=1,
                max_size=40).filter(lambda t: t.strip() and find_special_token(t) is None)


@st.composite
def conversations(draw):
    msgs = [msg("system", draw(_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 3))):
        msgs += [msg("user", draw(_text)), msg("assistant", draw(_text))]
    msgs.append(msg("user", draw(_text)))
    good, bad = draw(st.lists(_text, min_size=2, max_size=2, unique=True))
    return {"chosen": msgs + [msg("assistant", good)], "rejected": msgs + [msg("assistant", bad)]}


@given(conversations())
def test_valid_conversations_round_trip(rec):
    out = to_trl_record(rec)
    assert out["prompt"] + out["chosen"] == rec["chosen"]
    assert out["prompt"] + out["rejected"] == rec["rejected"]
    assert check_trl_record(out) == out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(conversations(), min_size=1, max_size=5))
def test_valid_files_round_trip(recs):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "dpo.jsonl"
        src.write_bytes(b"\r\n".join(line(r) for r in recs) + b"\r\n")
        stats = convert_file(src, Path(d) / "out", progress=False)
        assert stats["converted"] == len(recs) and stats["rejected"] == 0
        out = read_jsonl(Path(d) / "out" / "train.jsonl")
        assert [o["prompt"] + o["chosen"] for o in out] == [r["chosen"] for r in recs]


# ---------------------------------------------------------------------------------------------------------
# With a tokenizer: the masking layer rejects records with nothing to score


@pytest.fixture(scope="module")
def minimind2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "minimind2")))


def test_tokenizer_path_rejects_records_with_nothing_to_score(tmp_path, minimind2):
    long_prompt = pair(prompt="word " * 200, good="short", bad="brief")
    lines = [(line(pair()), None), (line(long_prompt), "no_scored_tokens"), (line(pair("Q2", "A2", "B2")), None)]
    src = tmp_path / "dpo.jsonl"
    _write_input(src, lines, bom=False, crlf=False)
    stats = convert_file(src, tmp_path / "out", tokenizer=minimind2, max_length=64, progress=False)
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "no_scored_tokens")]
    assert stats["converted"] == 2
    lengths = stats["token_lengths"]
    assert lengths["chosen"]["max"] <= 64 and lengths["chosen_scored"]["min"] > 0


def test_tokenizer_path_seed_record_stats_and_warnings(tmp_path, minimind2):
    src = shared_path("samples", "seed_record.jsonl")
    stats = convert_file(src, tmp_path / "out", tokenizer=minimind2, max_length=1024, progress=False)
    assert stats["token_lengths"]["chosen_scored"]["max"] == 279
    assert stats["token_lengths"]["rejected_scored"]["max"] == 330
    # Cut inside the answers: converted, but flagged with its line number.
    stats = convert_file(src, tmp_path / "cut", tokenizer=minimind2, max_length=100, progress=False)
    assert stats["converted"] == 1 and stats["warnings_by_code"]["answer_truncated"] == 2
    assert {w["line"] for w in stats["warnings"]} == {1}


def test_tokenizer_specials_are_forbidden_in_contents(tmp_path, minimind2):
    class Tok:
        all_special_tokens = ["<unk>"]
        added_tokens_decoder = {}

    assert "<unk>" in special_tokens(Tok())
    assert set(minimind2.all_special_tokens) <= set(special_tokens(minimind2))


def test_tokenizer_without_chat_template_is_a_user_error(tmp_path, minimind2):
    import copy

    tok = copy.deepcopy(minimind2)
    tok.chat_template = None
    src = tmp_path / "dpo.jsonl"
    src.write_bytes(line(pair()) + b"\n")
    with pytest.raises(UserError, match="no_chat_template"):
        convert_file(src, tmp_path / "out", tokenizer=tok, progress=False)
    assert not (tmp_path / "out").exists()
