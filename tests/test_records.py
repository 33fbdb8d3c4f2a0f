"""minidpo.records: one MiniMind or TRL record validated, converted, or rejected with its code."""

import json

import pytest
from hypothesis import given

from helpers import shared_path
from records_data import minimind_records, msg, pair
from minidpo.errors import RecordError
from minidpo.records import check_trl_record, find_special_token, special_tokens, to_trl_record


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



@given(minimind_records())
def test_valid_conversations_round_trip(rec):
    out = to_trl_record(rec)
    assert out["prompt"] + out["chosen"] == rec["chosen"]
    assert out["prompt"] + out["rejected"] == rec["rejected"]
    assert check_trl_record(out) == out


def test_tokenizer_specials_are_forbidden_in_contents():
    from transformers import AutoTokenizer

    class Tok:
        all_special_tokens = ["<unk>"]
        added_tokens_decoder = {}

    assert "<unk>" in special_tokens(Tok())
    minimind2 = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "minimind2")))
    assert set(minimind2.all_special_tokens) <= set(special_tokens(minimind2))
