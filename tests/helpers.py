"""Helpers the test files share: paths, tiny offline assets, subprocess environments and independent references.

Nothing here imports minidpo at module level, so a test file's own imports decide what it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIDPO_SHARED", REPO.parent / "shared"))
# What the repository ships itself (the MiniMind2 tokenizer, Apache-2.0, see its NOTICE), laid out as ../shared is,
# so a test that needs only that reads it on a fresh clone, and on the GPU machine, where ../shared does not travel.
SHIPPED = REPO / "scripts" / "assets"
TRAIN_PY = REPO / "minidpo" / "train.py"
# Hang guard of a subprocess (a training launch, a bench run): each takes seconds to a minute on 2 idle cores, and
# must not fail only because the machine is busy (load 8 on 2 cores is 4x slower), so ten times that and more.
SUBPROCESS_TIMEOUT = 900
PNG = b"\x89PNG\r\n\x1a\n"


def shared_path(*parts) -> Path:
    """A file the repository ships under scripts/assets/, else one under ../shared, else skip the test with the reason (a
    fresh clone outside CI has no ../shared)."""
    if SHIPPED.joinpath(*parts).exists():
        return SHIPPED.joinpath(*parts)
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is missing: this test needs ../shared (MiniMind test data) beside the checkout")
    return p


def write_tiny_assets(root: Path, pairs: int, data_seed: int, model_dir: str = "base") -> Path:
    """`root/model_dir`: the embedded tokenizer + tiny Llama; `root/dpo.jsonl`: MiniMind-format pairs."""
    from minidpo import embedded

    embedded.save_base_model(root / model_dir)
    embedded.write_jsonl(embedded.make_preference_records(pairs, seed=data_seed), root / "dpo.jsonl")
    return root


def save_small_model(path: Path, tokenizer_edit=None, vocab_size=None) -> Path:
    """The embedded tokenizer beside a 1-layer, 32-wide Llama in one folder; `tokenizer_edit(tok)` alters the
    tokenizer before saving, `vocab_size` resizes the model's embedding."""
    from minidpo import embedded

    tok = embedded.build_tokenizer()
    if tokenizer_edit:
        tokenizer_edit(tok)
    model = embedded.build_tiny_model(embedded.build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, intermediate_size=64)
    if vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def is_png(path) -> bool:
    """A PNG file with a picture in it (an empty figure is under 2 kB)."""
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def to_trl(record: dict) -> dict:
    """A MiniMind record as a TRL conversational record, without minidpo's validation."""
    return {"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}


def subprocess_env(tmp_path: Path | None = None, threads: int | None = None) -> dict:
    """The environment of a minidpo subprocess: offline, the checkout importable, no user-level accelerate config,
    and with `tmp_path` a private HF_HOME."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("ACCELERATE_CONFIG_FILE", None)
    if tmp_path is not None:
        env["HF_HOME"] = str(tmp_path / "hf-home")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def read_jsonl(path) -> list:
    # Split on "\n" only: contents may hold U+0085/U+2028, which str.splitlines() would also split on.
    return [json.loads(x) for x in Path(path).read_bytes().decode("utf-8").split("\n") if x]


def perturbed_policy(tokenizer, scale: float = 0.3):
    """The embedded tiny Llama (seed 0, the reference's init) moved away from it deterministically, so the
    log-ratios are far from 0."""
    import torch

    from minidpo.embedded import build_tiny_model

    model = build_tiny_model(tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def seq_logp(model, ids, mask, average: bool = True):
    """Log-prob of the scored tokens of one sequence (`mask[i]` scores token i), from a full-sequence forward
    and a log-softmax over the whole vocabulary: the seed's formula (the walkthrough in ../shared/seed/ this project
    started from: MiniMind's dpo_loss on masked, length-averaged log-probs), independent of TRL and minidpo. Keeps the
    graph (call under torch.no_grad() when no gradient is wanted)."""
    import torch

    ids_t = torch.tensor([ids])
    logits = model(input_ids=ids_t).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids_t[0, 1:, None]).squeeze(1)
    m = torch.tensor(mask[1:], dtype=logp.dtype)
    total = (logp * m).sum()
    return total / m.sum().clamp_min(1e-8) if average else total


EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"


def post_processing_chat(text, empty_think_ratio=0.2):
    """minimind-3's post_processing_chat (dataset/lm_dataset.py at 3f1a7cc), re-implemented: with the global
    `random`, every empty think block of a rendered side goes when random() > empty_think_ratio; a text without one
    draws nothing."""
    import random

    if EMPTY_THINK_BLOCK in text and random.random() > empty_think_ratio:
        text = text.replace(EMPTY_THINK_BLOCK, "")
    return text


def minimind_reference(messages, tokenizer, max_length, post_process=None):
    """MiniMind's DPODataset.__getitem__ for one side, re-implemented from the walkthrough (no minidpo code): render
    with the chat template (then `post_process(text)`, minimind-3's `post_processing_chat`), tokenize with
    truncation and padding to max_length, search the "<bos>assistant\\n" / "<eos>\\n" markers over the padded ids,
    shift by one. Returns (x, y, mask) lists of length max_length - 1."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos_id = tokenizer(f"{tokenizer.bos_token}assistant\n", add_special_tokens=False).input_ids
    eos_id = tokenizer(f"{tokenizer.eos_token}\n", add_special_tokens=False).input_ids
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if post_process is not None:
        text = post_process(text)
    ids = tokenizer(text, truncation=True, max_length=max_length, padding="max_length").input_ids
    assert all(t == pad for t in ids[len(tokenizer(text).input_ids):])
    loss_mask = [0] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i : i + len(bos_id)] == bos_id:
            start = i + len(bos_id)
            end = start
            while end < len(ids):
                if ids[end : end + len(eos_id)] == eos_id:
                    break
                end += 1
            for j in range(start, min(end + len(eos_id), max_length)):
                loss_mask[j] = 1
            i = end + len(eos_id) if end < len(ids) else len(ids)
        else:
            i += 1
    return ids[:-1], ids[1:], loss_mask[1:]


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr ends with exactly one `error:` line, no traceback, holding every needle; returns that line."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0], "the error must be the last thing printed"
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# Preference records and input files


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
