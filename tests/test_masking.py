"""encode_pair scores exactly the tokens MiniMind scores.

`minimind_reference` below is an independent re-implementation of MiniMind's DPODataset as the walkthrough in
../shared/seed describes it: render with the chat template, tokenize with truncation and padding to
max_length, search the "<bos>assistant\\n" / "<eos>\\n" markers over the padded ids, then shift by one. It
shares no code with minidpo.masking; the tests compare the two token for token.
"""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from helpers import shared_path
from references import minimind_reference
from minidpo.embedded import build_tokenizer
from minidpo.errors import RecordError, UserError
from minidpo.masking import check_tokenizer, encode_pair_with_issues, encode_pair, uses_minimind_markers


def assert_same_as_minimind(record, tokenizer, max_length):
    ours = encode_pair(record, tokenizer, max_length=max_length, mask_mode="minimind")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for side in ("chosen", "rejected"):
        x, y, ref_mask = minimind_reference(record["prompt"] + record[side], tokenizer, max_length)
        ids, mask = ours[f"{side}_input_ids"], ours[f"{side}_loss_mask"]
        n = len(ids)
        assert len(mask) == n <= max_length
        padded = x + y[-1:]
        assert ids == padded[:n], f"{side}: token ids differ"
        assert all(t == pad for t in padded[n:]), f"{side}: MiniMind kept real tokens we dropped"
        assert mask[0] == 0
        # MiniMind's mask_chosen[j] scores y[j] == ids[j + 1]
        assert mask[1:] == ref_mask[: n - 1], f"{side}: scored positions differ"
        assert not any(ref_mask[n - 1 :]), f"{side}: MiniMind scores padding here"


def trl(messages_chosen, answer_rejected):
    return {"prompt": messages_chosen[:-1], "chosen": messages_chosen[-1:],
            "rejected": [{"role": "assistant", "content": answer_rejected}]}


def conv(*pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs


CASES = {
    "single-turn": trl(conv(("What is DPO?", "Direct Preference Optimization.")), "No idea."),
    "multi-turn": trl(conv(("Hi", "Hello! How can I help?"), ("Name a colour", "Blue."), ("Another?", "Green.")),
                      "I won't."),
    "system-prompt": trl(conv(("Say hi", "Hi there."), system="You are terse."), "Greetings, dear user, hello."),
    "cjk": trl(conv(("你好，请介绍一下你自己。", "我是一个乐于助人的助手。"), ("日本語は？", "少し話せます。")), "不知道。"),
    "emoji-code": trl(conv(("Write code 🐍", "```python\ndef f(x):\n    return x * 2  # 🚀\n```\n")),
                      "print('hi') 😀\n\ttabbed"),
    "leading-newline": trl(conv(("Start with a newline", "\n\nIndented answer\n"), ("again", "\n x")), "\nplain"),
    "whitespace-edges": trl(conv(("  spaced  ", "  answer with spaces  "), ("\t", " \n ")), "\r\n windows"),
}


@pytest.fixture(scope="module", params=["embedded", "minimind2", "minimind3"])
def tokenizer(request):
    if request.param == "embedded":
        return build_tokenizer()
    return AutoTokenizer.from_pretrained(shared_path("tokenizers", request.param))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("max_length", [1024, 40, 12])
def test_matches_minimind_token_for_token(tokenizer, case, max_length):
    assert uses_minimind_markers(tokenizer)
    assert_same_as_minimind(CASES[case], tokenizer, max_length)


def walkthrough_ids():
    """The two id lists the walkthrough prints (x_chosen / x_rejected with padding removed)."""
    doc = shared_path("seed", "minimind-dpo-walkthrough.zh.md").read_text(encoding="utf-8")
    lists = re.findall(r"去 pad 后长度 (\d+)\):\n(\[[\d, ]+\])", doc)
    assert len(lists) == 2
    return [json.loads(ids) for n, ids in lists if len(json.loads(ids)) == int(n)]


def test_seed_record_gives_walkthrough_ids_and_counts():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "minimind2"))
    raw = json.loads(shared_path("samples", "seed_record.jsonl").read_text().splitlines()[0])
    record = {"prompt": raw["chosen"][:-1], "chosen": raw["chosen"][-1:], "rejected": raw["rejected"][-1:]}
    out = encode_pair(record, tok, max_length=1024)
    chosen_ids, rejected_ids = walkthrough_ids()
    assert out["chosen_input_ids"] == chosen_ids and len(chosen_ids) == 307
    assert out["rejected_input_ids"] == rejected_ids and len(rejected_ids) == 358
    assert sum(out["chosen_loss_mask"]) == 279 and sum(out["rejected_loss_mask"]) == 330
    # scored from just after "<|im_start|>assistant\n" (index 28) through the closing "<|im_end|>\n"
    assert out["chosen_loss_mask"] == [0] * 28 + [1] * 279
    assert_same_as_minimind(record, tok, 1024)


text = st.lists(
    st.sampled_from(list("abcXYZ019 .,!?\n\t") + ["你", "好", "世", "界", "😀", "🚀", "é", "\r\n", "  ", "Hello", "assistant"]),
    min_size=1, max_size=30,
).map("".join).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    pairs = [(draw(text), draw(text)) for _ in range(turns)]
    system = draw(st.one_of(st.none(), text))
    chosen = conv(*pairs, system=system)
    rejected = draw(text.filter(lambda s: s != pairs[-1][1]))
    return trl(chosen, rejected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=conversations(), max_length=st.integers(8, 120))
def test_property_matches_minimind(record, max_length):
    assert_same_as_minimind(record, _embedded(), max_length)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=conversations(), max_length=st.integers(8, 120))
def test_property_matches_minimind_real_tokenizers(record, max_length):
    for tok in _minimind_tokenizers():
        assert_same_as_minimind(record, tok, max_length)


_CACHE = {}


def _embedded():
    if "embedded" not in _CACHE:
        _CACHE["embedded"] = build_tokenizer()
    return _CACHE["embedded"]


def _minimind_tokenizers():
    if "mm" not in _CACHE:
        _CACHE["mm"] = [AutoTokenizer.from_pretrained(shared_path("tokenizers", n)) for n in ("minimind2", "minimind3")]
    return _CACHE["mm"]


def scored_text(tokenizer, ids, mask):
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


@settings(max_examples=60, deadline=None)
@given(record=conversations())
def test_template_spans_agree_with_markers_on_minimind2_layout(record):
    """The template-derived spans (used for tokenizers without MiniMind markers) give MiniMind's mask on its layout."""
    tok = _embedded()
    markers = encode_pair(record, tok)
    spans = _with_template_spans(tok, record)
    assert spans == markers


def _with_template_spans(tok, record, mask_mode="minimind"):
    # Without a bos token MiniMind's markers cannot be formed, so the template way is taken.
    clone = build_tokenizer()
    clone.bos_token = None
    assert not uses_minimind_markers(clone)
    return encode_pair(record, clone, mask_mode=mask_mode)


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_other_chat_layout_scores_every_assistant_turn_exactly():
    """A Llama-3-style layout (bos is not the turn opener): every answer plus its end-of-turn token is scored."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = LLAMA3_TEMPLATE
    assert not uses_minimind_markers(tok)
    record = CASES["multi-turn"]
    out = encode_pair(record, tok)
    answers = [m["content"] for m in record["prompt"] if m["role"] == "assistant"] + [record["chosen"][0]["content"]]
    assert scored_text(tok, out["chosen_input_ids"], out["chosen_loss_mask"]) == "".join(a + "<|eot_id|>" for a in answers)
    last = encode_pair(record, tok, mask_mode="last-turn")
    assert scored_text(tok, last["rejected_input_ids"], last["rejected_loss_mask"]) == "I won't.<|eot_id|>"
    assert last["chosen_input_ids"] == out["chosen_input_ids"]


def test_last_turn_scores_only_the_final_answer(tokenizer):
    record = CASES["multi-turn"]
    out = encode_pair(record, tokenizer, mask_mode="last-turn")
    text = scored_text(tokenizer, out["chosen_input_ids"], out["chosen_loss_mask"])
    assert text == "Green." + tokenizer.eos_token + "\n"
    assert out["chosen_input_ids"] == encode_pair(record, tokenizer)["chosen_input_ids"]


def test_minimind_mode_on_minimind3_scores_the_empty_think_block():
    """Documented oddity: minimind-3's template inserts '<think>\\n\\n</think>\\n\\n' after the header; MiniMind scores it."""
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "minimind3"))
    out = encode_pair(CASES["single-turn"], tok)
    assert scored_text(tok, out["chosen_input_ids"], out["chosen_loss_mask"]) == (
        "<think>\n\n</think>\n\nDirect Preference Optimization.<|im_end|>\n")


@pytest.mark.parametrize("max_length", [1024, 30])
def test_no_think_sequences_are_minimind3_renders_without_their_empty_think_blocks(max_length):
    """Each side without its empty think blocks (every turn's: minimind-3's post_processing_chat replaces them all)
    is what MiniMind tokenizes and masks after that removal, truncation included; a render without a block (MiniMind2's
    template writes none) has no such sequence."""
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "minimind3"))
    record = CASES["multi-turn"]
    out = encode_pair(record, tok, max_length=max_length, no_think=True)
    for side in ("chosen", "rejected"):
        x, y, ref_mask = minimind_reference(record["prompt"] + record[side], tok, max_length,
                                            lambda text: text.replace("<think>\n\n</think>\n\n", ""))
        ids, mask = out[f"{side}_no_think_input_ids"], out[f"{side}_no_think_loss_mask"]
        n = len(ids)
        assert ids == ([x[0]] + y)[:n] and mask[1:] == ref_mask[:n - 1] and not any(ref_mask[n - 1:])
        assert "<think>" not in tok.decode(ids) and ids != out[f"{side}_input_ids"]
    assert encode_pair(record, tok, max_length=max_length) == {k: v for k, v in out.items() if "no_think" not in k}
    minimind2 = AutoTokenizer.from_pretrained(shared_path("tokenizers", "minimind2"))
    assert encode_pair(record, minimind2, no_think=True)["chosen_no_think_input_ids"] == []
    with pytest.raises(RecordError) as e:
        encode_pair(record, tok, no_think=True, mask_mode="last-turn")
    assert e.value.code == "no_think_needs_markers"


def test_diagnose_flags_truncation_and_rejects_unscorable(tokenizer):
    record = CASES["multi-turn"]
    full = encode_pair(record, tokenizer)
    first_scored = full["chosen_loss_mask"].index(1)
    _, issues = encode_pair_with_issues(record, tokenizer, max_length=first_scored + 2)
    codes = {i.code for i in issues if i.fatal}
    # the first turn is scored, so only the truncation is reported, nothing fatal
    assert "answer_truncated" in {i.code for i in issues} and not codes
    header_cut = 3
    _, issues = encode_pair_with_issues(record, tokenizer, max_length=header_cut)
    assert any(i.code == "no_scored_tokens" and i.fatal for i in issues)


def test_clear_errors_for_unusable_tokenizers():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(RecordError) as e:
        encode_pair(CASES["single-turn"], tok)
    assert e.value.code == "no_chat_template"
    with pytest.raises(RecordError):
        encode_pair(CASES["single-turn"], build_tokenizer(), mask_mode="everything")


def test_check_tokenizer_refuses_before_any_record_and_tells_the_scheme(tokenizer):
    """A usable tokenizer: True when MiniMind's marker search runs on it (its ChatML templates), False for spans
    from the template; an unusable one is a one-line UserError naming the problem's code."""
    assert check_tokenizer(tokenizer) is True  # the embedded, MiniMind2 and minimind-3 tokenizers are all ChatML
    tok = build_tokenizer()
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "[start]")  # no "<bos>assistant\n" marker
    assert check_tokenizer(tok) is False
    tok.chat_template = None
    with pytest.raises(UserError, match=r"cannot be used \(no_chat_template\)") as e:
        check_tokenizer(tok)
    assert e.value.code == "bad_tokenizer"


def test_header_merging_with_answer_is_reported_and_matches_minimind():
    """A vocabulary with a "\\n\\n" token swallows the header's newline when an answer starts with "\\n": MiniMind's
    search then misses that turn. We score what MiniMind scores, and say so."""
    tok = build_tokenizer()
    tok.add_tokens(["\n\n"])
    multi = trl(conv(("first", "\nstarts with a newline"), ("second", "plain")), "other")
    assert_same_as_minimind(multi, tok, 256)
    out, issues = encode_pair_with_issues(multi, tok)
    assert [i.code for i in issues] == ["unscored_assistant_turn", "unscored_assistant_turn"]
    assert not any(i.fatal for i in issues)
    assert scored_text(tok, out["chosen_input_ids"], out["chosen_loss_mask"]) == "plain<|im_end|>\n"

    single = trl(conv(("q", "\nanswer")), "fine answer")
    assert_same_as_minimind(single, tok, 256)
    _, issues = encode_pair_with_issues(single, tok)
    assert {(i.code, i.fatal) for i in issues} == {("unscored_assistant_turn", False), ("no_scored_tokens", True)}
