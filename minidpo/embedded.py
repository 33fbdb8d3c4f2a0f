"""The embedded default: a chat tokenizer, a tiny Llama and synthetic preference data.

Everything here is built from text in this module, so the quickstart and the tests run
offline and without ../shared. The conventions follow MiniMind2: ChatML special tokens
with ids 0/1/2, byte-level BPE, and MiniMind's chat template (without tools).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # list order gives MiniMind's ids 0, 1, 2
VOCAB_SIZE = 1536
DEFAULT_SYSTEM = "You are a helpful assistant"

# MiniMind2's template with the tool branches dropped. A leading system message replaces the
# default one; non-string content renders as "" like upstream.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

# ---------------------------------------------------------------------------------------------
# Content shared by the tokenizer corpus and the preference records, so the words the records
# use are single tokens or short merges rather than byte soup.

EN_TOPICS = [
    ("the moon", "orbits the earth about once every 27 days"),
    ("green tea", "is made by steeping dried leaves in hot water"),
    ("a bicycle", "turns pedal power into motion through a chain"),
    ("the ocean", "covers roughly 71 percent of the planet"),
    ("a compass", "points north because of the magnetic field"),
    ("bread", "rises when yeast releases small bubbles of gas"),
    ("a volcano", "forms where melted rock reaches the surface"),
    ("the heart", "pumps blood through the body all day and night"),
    ("a rainbow", "appears when sunlight bends inside raindrops"),
    ("python", "is a programming language known for clear syntax"),
    ("a library", "lends books to anyone who has a card"),
    ("the piano", "has 88 keys and makes sound with small hammers"),
    ("honey", "is made by bees from the nectar of flowers"),
    ("a glacier", "is a slow river of ice that moves downhill"),
    ("the internet", "links millions of computers around the world"),
    ("a lighthouse", "guides ships at night with a bright lamp"),
    ("coffee", "comes from the roasted seeds of a small red fruit"),
    ("snow", "forms when water vapor freezes into crystals"),
    ("a battery", "stores energy as chemical potential"),
    ("the desert", "gets very little rain in a whole year"),
]
ZH_TOPICS = [
    ("月亮", "大约每二十七天绕地球转一圈"),
    ("绿茶", "是用热水冲泡干茶叶做成的"),
    ("熊猫", "主要以竹子为食"),
    ("长城", "是中国古代修建的防御工事"),
    ("蜂蜜", "是蜜蜂用花蜜酿成的"),
    ("雪花", "是水蒸气在高空结成的冰晶"),
]

# The rule: a chosen answer names the topic that was asked about and ends with a polite
# closing; a rejected answer always ends with a curt closing and half the time names another
# topic. Closings are paired by length (word count and characters) so that neither side is
# systematically longer.
EN = {
    "questions": [
        "Tell me about {t}.",
        "What do you know about {t}?",
        "Can you explain {t} briefly?",
        "I am curious about {t}. Any facts?",
        "Give me one fact about {t}.",
    ],
    "followups": ["And what about {t}?", "Now tell me about {t}.", "What about {t} then?"],
    "answer": "{T} {f}.",
    "polite": ["Hope this helps!", "Happy to help anytime.", "Thanks for asking!", "Glad you asked."],
    "curt": ["Look it up yourself.", "Stop bothering me.", "That was obvious!", "Ask someone else."],
    "systems": [
        "You are a polite assistant.",
        "You are MiniMind, a small and friendly helper.",
        "Answer briefly and kindly.",
    ],
    "topics": EN_TOPICS,
}
ZH = {
    "questions": ["请介绍一下{t}。", "{t}是什么？", "你知道{t}吗？"],
    "followups": ["那{t}呢？", "再说说{t}吧。"],
    # The comma stops BPE merging across subject and fact, which would make a swapped
    # subject cost extra tokens.
    "answer": "{T}，{f}。",
    "polite": ["希望对你有帮助！", "很高兴为你解答。"],
    "curt": ["自己去查一下吧！", "别再来问我了。"],
    "systems": ["你是一个礼貌的助手。", "你是MiniMind，一个友好的小助手。"],
    "topics": ZH_TOPICS,
}
ZH_FRACTION = 0.2

_PROSE = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a simple rule.
It was a bright cold day in April, and the clocks were striking thirteen.
Please write a short poem about the sea. The waves roll in, the waves roll out.
How many days are there in a week? There are 7 days in a week and 12 months in a year.
She said, "I'll be there at 3:45 p.m.; don't be late!" He didn't answer.
Water boils at 100 degrees Celsius (212 °F) at sea level.
The price went from $19.99 to $24.50 - an increase of about 22.6%.
Call me at +1 (555) 010-2024, or email team@example.com before 2025-06-30.
Lists help: first, read the question; second, think; third, answer clearly.
Why is the sky blue? Sunlight scatters off air molecules, and blue light scatters most.
Learning takes time, patience and practice. Mistakes are part of the process!
Dear user, thank you for your message. We will reply as soon as possible.
Good morning! Good evening! Good night. See you tomorrow.
The train leaves at 08:15 from platform 4 and arrives at 11:40.
I think, therefore I am. To be, or not to be: that is the question.
Rain, rain, go away; come again another day.

人工智能正在改变我们的生活。今天天气很好，我们去公园散步吧。
小模型也可以学习简单的规则。请用一句话回答这个问题。
谢谢你的帮助！不客气，这是我应该做的。
你好，我是一个助手。有什么可以帮你的吗？
中国的首都是北京。一年有十二个月，一周有七天。
学而时习之，不亦说乎？有朋自远方来，不亦乐乎？
東京は日本の首都です。ありがとうございます。
안녕하세요. 감사합니다.

def add(a, b):
    return a + b

for i in range(10):
    print(f"step {i}: loss={0.5 / (i + 1):.4f}")

class Config:
    hidden_size: int = 64
    num_layers: int = 2

if __name__ == "__main__":
    main()

{"role": "user", "content": "hello"}
[1, 2, 3, 4, 5], {"a": 1, "b": [true, false, null]}
x = y * 2 + 3 // 4 - (z ** 2) % 5
if (x > 0 && y < 10) { return x; } else { return -1; }
SELECT name, age FROM users WHERE age >= 18 ORDER BY name;
git commit -m "fix: handle empty input"
pip install torch transformers trl
0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1000 1024 2048 3.14159 2.71828 1e-5 1e6
!!! ??? ... --- *** ### @@@ ~~~ <<< >>> === ||| &&& ^^^ %%% $$$ :: ;; ,, '' ""
Emoji are fine too 😀 🎉 👍 ❤️ 🚀
"""


def _corpus() -> list[str]:
    """Training text: the prose above, the chat-template words, and every record fragment."""
    lines = _PROSE.splitlines(keepends=True)
    # Repeated so each role name becomes a single token, as in MiniMind's vocabulary.
    lines += ["system\n", "user\n", "assistant\n"] * 8 + [DEFAULT_SYSTEM + "\n"]
    for lang in (EN, ZH):
        for t, f in lang["topics"]:
            for q in lang["questions"] + lang["followups"]:
                lines.append(q.format(t=t) + "\n")
            # Both closing pools appear equally often, so neither side of a pair gets
            # shorter token sequences from the tokenizer alone.
            for closing in lang["polite"] + lang["curt"]:
                lines.append(lang["answer"].format(T=_cap(t), f=f) + " " + closing + "\n")
        lines += [s + "\n" for s in lang["systems"]]
    return lines


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Same pipeline as MiniMind2's tokenizer.json: byte-level, no prefix space, GPT-2 regex.
    # The regex keeps "\n" apart from the words around it, so "<|im_start|>assistant\n" gives
    # the same ids alone and inside a conversation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(cache_dir: str | Path | None = None):
    """MiniMind-style ChatML tokenizer trained on the embedded corpus.

    With ``cache_dir`` the tokenizer is saved there and the reloaded copy is returned, so the
    folder is known to load with ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if cache_dir is None:
        return tokenizer
    tokenizer.save_pretrained(cache_dir)
    return AutoTokenizer.from_pretrained(cache_dir)


# ---------------------------------------------------------------------------------------------
# Model


def build_tiny_model(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 176,
    seed: int = 0,
):
    """A randomly initialised float32 Llama shaped like a miniature MiniMind2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # fork_rng so seeding the init does not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def save_base_model(path: str | Path, seed: int = 0):
    """The embedded tokenizer and a tiny Llama saved together as one Transformers folder (what training loads)."""
    tokenizer = build_tokenizer(path)
    build_tiny_model(tokenizer, seed=seed).save_pretrained(path)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Preference records


def _answer(lang: dict, topic: tuple[str, str], closing: str, subject: str | None = None) -> str:
    name, fact = topic
    return lang["answer"].format(T=_cap(subject or name), f=fact) + " " + closing


def _record(rng: random.Random, multi_turn_fraction: float, system_fraction: float) -> dict:
    lang = ZH if rng.random() < ZH_FRACTION else EN
    topics = lang["topics"]
    messages = []
    if rng.random() < system_fraction:
        messages.append({"role": "system", "content": rng.choice(lang["systems"])})
    if rng.random() < multi_turn_fraction:
        # The earlier assistant turn obeys the rule: it is context both answers share.
        first = rng.choice(topics)
        messages.append({"role": "user", "content": rng.choice(lang["questions"]).format(t=first[0])})
        messages.append({"role": "assistant", "content": _answer(lang, first, rng.choice(lang["polite"]))})
        templates = lang["followups"]
    else:
        templates = lang["questions"]
    topic = rng.choice(topics)
    messages.append({"role": "user", "content": rng.choice(templates).format(t=topic[0])})

    chosen = _answer(lang, topic, rng.choice(lang["polite"]))
    # Rejected reuses the fact; its closing is curt and, half the time, its subject is a
    # different topic drawn from the same pool so subject lengths differ with zero mean.
    wrong_subject = rng.choice([t for t in topics if t is not topic])[0] if rng.random() < 0.5 else None
    rejected = _answer(lang, topic, rng.choice(lang["curt"]), subject=wrong_subject)
    return {
        "chosen": messages + [{"role": "assistant", "content": chosen}],
        "rejected": messages + [{"role": "assistant", "content": rejected}],
    }


def make_preference_records(
    n: int, seed: int = 0, multi_turn_fraction: float = 0.3, system_fraction: float = 0.2
) -> list[dict]:
    """``n`` MiniMind ``dpo.jsonl`` records ``{"chosen": [...], "rejected": [...]}``.

    Both message lists share everything but the final assistant answer. Chosen answers name the
    asked topic and end politely; rejected ones end curtly and sometimes name the wrong topic.
    """
    rng = random.Random(seed)
    return [_record(rng, multi_turn_fraction, system_fraction) for _ in range(n)]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """One JSON object per line, UTF-8, non-ASCII kept readable like MiniMind's files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
