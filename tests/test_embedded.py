import json

import pytest
import torch

from minidpo.embedded import (
    build_tiny_model,
    build_tokenizer,
    make_preference_records,
    write_jsonl,
)

SAMPLES = [
    "Hello, world!  Two  spaces,\ttabs and a trailing newline\n",
    "人工智能正在改变我们的生活。東京は日本の首都です。",
    "Emoji 😀🎉👍 and accents: café, naïve, ñ",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "  leading spaces, <b>tags</b>, {\"json\": [1, 2.5e-3]}",
]

TURNS = [
    {"role": "user", "content": "Tell me about the moon."},
    {"role": "assistant", "content": "The moon orbits the earth. Hope this helps!"},
    {"role": "user", "content": "And what about snow?"},
    {"role": "assistant", "content": "Snow forms from ice crystals. Glad you asked."},
]
BODY = (
    "<|im_start|>user\nTell me about the moon.<|im_end|>\n"
    "<|im_start|>assistant\nThe moon orbits the earth. Hope this helps!<|im_end|>\n"
    "<|im_start|>user\nAnd what about snow?<|im_end|>\n"
    "<|im_start|>assistant\nSnow forms from ice crystals. Glad you asked.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_is_deterministic(tok):
    again = build_tokenizer()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert [ids(again, s) for s in SAMPLES] == [ids(tok, s) for s in SAMPLES]


def test_special_tokens_and_vocab(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert 1000 <= len(tok) <= 2000
    # Plain encoding adds nothing: the chat template is the only place specials come from.
    assert ids(tok, "hi") == tok("hi")["input_ids"]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(ids(tok, text)) == text


def test_newline_is_one_token(tok):
    (newline,) = ids(tok, "\n")
    assert ids(tok, "\n\n\n") == [newline] * 3
    assert ids(tok, "a\nb").count(newline) == 1


def test_chat_template_default_system(tok):
    rendered = tok.apply_chat_template(TURNS, tokenize=False)
    assert rendered == "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n" + BODY


def test_chat_template_given_system(tok):
    messages = [{"role": "system", "content": "Be kind."}] + TURNS
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nBe kind.<|im_end|>\n" + BODY


def test_generation_prompt(tok):
    rendered = tok.apply_chat_template(TURNS[:3], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nAnd what about snow?<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_header_ids_match_in_context(tok):
    header = ids(tok, "<|im_start|>assistant\n")
    assert header[0] == 1 and len(header) == 3
    full = ids(tok, tok.apply_chat_template(TURNS, tokenize=False))
    starts = [i for i in range(len(full)) if full[i : i + len(header)] == header]
    assert len(starts) == 2
    # The prompt with a generation prompt is a token-level prefix of the full conversation.
    prompt = ids(tok, tok.apply_chat_template(TURNS[:3], tokenize=False, add_generation_prompt=True))
    assert full[: len(prompt)] == prompt and prompt[-len(header) :] == header


def test_cache_dir_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    cached = build_tokenizer(cache_dir=tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in (cached, reloaded):
        assert [ids(t, s) for s in SAMPLES] == [ids(tok, s) for s in SAMPLES]
        assert t.apply_chat_template(TURNS, tokenize=False) == tok.apply_chat_template(TURNS, tokenize=False)
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)


def test_model_deterministic_and_forward(tok):
    a, b, c = (build_tiny_model(tok, seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in a.parameters())
    cfg = a.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (len(tok), 1, 2, 0)
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-5

    batch = tok(["Tell me about the moon.", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = a(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)


def test_model_seed_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tok, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_records_valid():
    records = make_preference_records(300, seed=3)
    assert len(records) == 300
    for r in records:
        chosen, rejected = r["chosen"], r["rejected"]
        assert chosen[:-1] == rejected[:-1] and len(chosen) == len(rejected)
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        roles = [m["role"] for m in chosen if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(set(m) == {"role", "content"} and m["content"] for m in chosen + rejected)
    multi = sum(len(r["chosen"]) - (r["chosen"][0]["role"] == "system") == 4 for r in records)
    system = sum(r["chosen"][0]["role"] == "system" for r in records)
    assert 0.15 < multi / 300 < 0.45 and 0.1 < system / 300 < 0.3


def test_records_deterministic_and_seeded():
    assert make_preference_records(50, seed=1) == make_preference_records(50, seed=1)
    assert make_preference_records(50, seed=1) != make_preference_records(50, seed=2)
    assert make_preference_records(0) == []


def test_records_fractions_respected():
    plain = make_preference_records(50, multi_turn_fraction=0.0, system_fraction=0.0)
    assert all(len(r["chosen"]) == 2 for r in plain)


def test_lengths_do_not_give_the_preference_away(tok):
    records = make_preference_records(500)
    n = lambda r, side: len(ids(tok, r[side][-1]["content"]))  # noqa: E731
    chosen = sum(n(r, "chosen") for r in records) / len(records)
    rejected = sum(n(r, "rejected") for r in records) / len(records)
    assert abs(chosen - rejected) < 0.5
    assert sum(n(r, "chosen") > n(r, "rejected") for r in records) > 50


def test_write_jsonl(tmp_path):
    records = make_preference_records(5)
    path = write_jsonl(records, tmp_path / "sub" / "dpo.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
