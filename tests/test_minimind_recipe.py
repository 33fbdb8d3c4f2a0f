"""configs/minimind2-small.yaml and configs/minimind3.yaml train as MiniMind's own train_dpo.py does, step for step.

The reference is an independent re-implementation of MiniMind's loop (no minidpo code): its DPODataset (masks by
marker search over ids padded to max_length, `references.minimind_reference`; for minimind-3 each side's render passes
through its post_processing_chat, `references.post_processing_chat`, which drops the empty think blocks at random with
Python's `random`), each epoch `setup_seed(42 + epoch)` (Python's and torch's generators) + `torch.randperm` read in
consecutive batches of 4 by a torch DataLoader (minimind-3: 2 workers, seeded by torch as MiniMind's are),
`get_lr(epoch * iters + step, epochs * iters, lr)` set before each batch from step 1, full-vocabulary log-softmax,
its dpo_loss (length-averaged with clamp_min(1e-8) for MiniMind2, summed for minimind-3),
`optim.AdamW(model.parameters())` and `clip_grad_norm_`. It and `minidpo train
--config configs/...` (sizes overridden on the command line, as a MiniMind user overrides its flags) train the same
MiniMind-made tiny checkpoint from ../shared on the same pairs.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, shared_path
from references import minimind_reference, post_processing_chat

EPOCHS, BATCH, PAIRS, MAX_LENGTH = 2, 4, 10, 96
LR, CLIP = 2e-3, 0.05  # large enough that the weights move; a clip that triggers
WORKERS = 2  # MiniMind's --num_workers for minimind-3 (its default is 8): batch 3 of an epoch reuses worker 0


class MiniMindPairs(torch.utils.data.Dataset):
    """MiniMind's DPODataset: each side rendered, for minimind-3 passed through post_processing_chat (its random
    draws), tokenized and masked when read; also says which sides lost their empty think blocks."""

    def __init__(self, records, tokenizer, think):
        self.records, self.tokenizer, self.think = records, tokenizer, think

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        dropped = []

        def post(text):
            out = post_processing_chat(text) if self.think else text
            dropped.append(out != text)
            return out

        return [minimind_reference(self.records[i][side], self.tokenizer, MAX_LENGTH, post)
                for side in ("chosen", "rejected")], dropped


def minimind_run(model, ref, tokenizer, records, beta, average, think):
    """MiniMind's train_dpo.py loop on `records` (MiniMind dicts): (per-step losses, per-step lrs, clipped steps,
    sides that lost their empty think blocks, sides read)."""
    dataset = MiniMindPairs(records, tokenizer, think)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    iters = math.ceil(len(records) / BATCH)
    losses, lrs, clipped, dropped = [], [], 0, []
    for epoch in range(EPOCHS):
        random.seed(42 + epoch)  # setup_seed(42 + epoch)
        torch.manual_seed(42 + epoch)
        order = torch.randperm(len(records)).tolist()
        batches = [order[start:start + BATCH] for start in range(0, len(order), BATCH)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=WORKERS if think else 0,
                                             collate_fn=list)
        for step, items in enumerate(loader, start=1):
            rows = [sides for sides, _ in items]
            dropped += [d for _, ds in items for d in ds]
            x = torch.tensor([c[0] for c, _ in rows] + [r[0] for _, r in rows])
            y = torch.tensor([c[1] for c, _ in rows] + [r[1] for _, r in rows])
            mask = torch.tensor([c[2] for c, _ in rows] + [r[2] for _, r in rows], dtype=torch.float32)
            lr = LR * (0.1 + 0.45 * (1 + math.cos(math.pi * (epoch * iters + step) / (EPOCHS * iters))))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.no_grad():
                ref_logp = torch.log_softmax(ref(x).logits.float(), -1).gather(2, y[..., None])[..., 0]
            logp = torch.log_softmax(model(x).logits.float(), -1).gather(2, y[..., None])[..., 0]
            ref_seq, seq = (ref_logp * mask).sum(1), (logp * mask).sum(1)
            if average:
                length = mask.sum(1).clamp_min(1e-8)
                ref_seq, seq = ref_seq / length, seq / length
            n = len(rows)
            logits = (seq[:n] - seq[n:]) - (ref_seq[:n] - ref_seq[n:])
            loss = -F.logsigmoid(beta * logits).mean()
            loss.backward()
            clipped += torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item() > CLIP
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            lrs.append(lr)
    return losses, lrs, clipped, dropped


@pytest.mark.slow
@pytest.mark.parametrize("version,config", [("minimind2", "minimind2-small.yaml"), ("minimind3", "minimind3.yaml")])
def test_config_trains_as_minimind(tmp_path, monkeypatch, version, config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minidpo import embedded, train
    from minidpo.minimind import import_minimind
    from minidpo.trainer import MiniDPOTrainer

    stem = {"minimind2": "minimind2-tiny", "minimind3": "minimind3-tiny"}[version]
    import_minimind(shared_path("minimind-checkpoints", f"{stem}.pth"), shared_path("tokenizers", version),
                    tmp_path / "hf")
    records = embedded.make_preference_records(PAIRS, seed=4, multi_turn_fraction=0.3)
    embedded.write_jsonl(records, tmp_path / "dpo.jsonl")

    seen = {"loss": [], "lr": []}
    compute_loss = MiniDPOTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if model.training:
            seen["loss"].append(loss.item())
            seen["lr"].append(self.optimizer.param_groups[0]["lr"])
        return loss

    monkeypatch.setattr(MiniDPOTrainer, "compute_loss", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for both runs
    try:
        train.main(*train.parse([
            "--config", str(REPO / "configs" / config), "--model_name_or_path", str(tmp_path / "hf"),
            "--dataset_name", str(tmp_path / "dpo.jsonl"), "--output_dir", str(tmp_path / "out"),
            "--learning_rate", str(LR), "--num_train_epochs", str(EPOCHS), "--max_length", str(MAX_LENGTH),
            "--max_grad_norm", str(CLIP), "--logging_steps", "1", "--save_strategy", "no",
            *(["--minimind_num_workers", str(WORKERS)] if version == "minimind3" else [])]))
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
        start = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).train()
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        beta, average, think = (0.15, False, True) if version == "minimind3" else (0.1, True, False)
        state = random.getstate()
        try:
            losses, lrs, clipped, dropped = minimind_run(model, ref, tokenizer, records, beta, average, think)
        finally:
            random.setstate(state)
    finally:
        torch.set_num_threads(threads)

    assert len(losses) == EPOCHS * math.ceil(PAIRS / BATCH) and clipped > 0  # the clip changes the update
    if think:  # the random removal took place, and not everywhere
        assert 0 < sum(dropped) < len(dropped), dropped
    assert seen["lr"] == pytest.approx(lrs, rel=1e-12)
    diff = max(abs(a - b) for a, b in zip(seen["loss"], losses))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    initial, theirs = start.state_dict(), model.state_dict()
    rel = max(((trained[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    moved = min(((theirs[k] - initial[k]).norm() / initial[k].norm()).item() for k in theirs)
    print(f"\n{version} ({config}): per-step loss max |diff| {diff:.1e}, final weights max relative diff {rel:.1e}, "
          f"weights moved >= {moved:.1e} relative")
    assert len(seen["loss"]) == len(losses) and diff <= 1e-5, (seen["loss"], losses)
    assert rel <= 1e-5 and moved > 100 * 1e-5


# ------------------------------------------------------------------------------------------------------------
# Each behaviour alone, without a Trainer (minidpo.minimind_recipe)


@pytest.mark.parametrize("schedule,half", [("cosine-1.1-to-0.1", 0.5), ("cosine-1.0-to-0.1", 0.45)])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_lr_factor_is_minimind_get_lr_per_batch(schedule, half, accumulation):
    """MiniMind's get_lr(step, total, lr) / lr, written out: 0.1 + half * (1 + cos(pi * step / total)), with step the
    1-based index of the last batch an optimizer step consumed."""
    from minidpo.minimind_recipe import lr_factor

    steps = 5
    factor = lr_factor(schedule, steps, accumulation)
    total = steps * accumulation
    for k in range(steps):
        step = (k + 1) * accumulation
        assert factor(k) == pytest.approx(0.1 + half * (1 + math.cos(math.pi * step / total)))
    assert factor(steps - 1) == pytest.approx(0.1)  # the floor at the last batch


def test_every_parameter_name_includes_norms_and_biases():
    from minidpo.embedded import build_tiny_model, build_tokenizer
    from minidpo.minimind_recipe import every_parameter_name

    model = build_tiny_model(build_tokenizer(), num_layers=1)
    names = every_parameter_name(model)
    assert names == [n for n, _ in model.named_parameters()]
    assert any("norm" in n for n in names)
