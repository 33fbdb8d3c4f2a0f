"""Independent references the tests hold minidpo to: the seed's DPO formula on full logits and MiniMind's own
DataLoader code, re-implemented from the walkthrough and MiniMind's sources (no minidpo code)."""

from __future__ import annotations


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
