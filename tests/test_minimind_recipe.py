"""configs/minimind2-small.yaml and configs/minimind3.yaml train as MiniMind's own train_dpo.py does, step for step.

The reference is an independent re-implementation of MiniMind's loop (no minidpo code): its DPODataset (masks by
marker search over ids padded to max_length, `helpers.minimind_reference`), each epoch `torch.manual_seed(42 +
epoch)` + `torch.randperm` read in consecutive batches of 4, `get_lr(epoch * iters + step, epochs * iters, lr)` set
before each batch from step 1, full-vocabulary log-softmax, its dpo_loss (length-averaged with clamp_min(1e-8) for
MiniMind2, summed for minimind-3), `optim.AdamW(model.parameters())` and `clip_grad_norm_`. It and `minidpo train
--config configs/...` (sizes overridden on the command line, as a MiniMind user overrides its flags) train the same
MiniMind-made tiny checkpoint from ../shared on the same pairs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, minimind_reference, shared_path

EPOCHS, BATCH, PAIRS, MAX_LENGTH = 2, 4, 10, 96
LR, CLIP = 2e-3, 0.05  # large enough that the weights move; a clip that triggers


def minimind_run(model, ref, tokenizer, records, beta, average):
    """MiniMind's train_dpo.py loop on `records` (MiniMind dicts): (per-step losses, per-step lrs, clipped steps)."""
    sides = [[minimind_reference(r[side], tokenizer, MAX_LENGTH) for side in ("chosen", "rejected")]
             for r in records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    iters = math.ceil(len(records) / BATCH)
    losses, lrs, clipped = [], [], 0
    for epoch in range(EPOCHS):
        torch.manual_seed(42 + epoch)
        order = torch.randperm(len(records)).tolist()
        for step, start in enumerate(range(0, len(order), BATCH), start=1):
            rows = [sides[i] for i in order[start:start + BATCH]]
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
    return losses, lrs, clipped


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
            "--max_grad_norm", str(CLIP), "--logging_steps", "1", "--save_strategy", "no"]))
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
        start = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).train()
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        beta, average = (0.15, False) if version == "minimind3" else (0.1, True)
        losses, lrs, clipped = minimind_run(model, ref, tokenizer, records, beta, average)
    finally:
        torch.set_num_threads(threads)

    assert len(losses) == EPOCHS * math.ceil(PAIRS / BATCH) and clipped > 0  # the clip changes the update
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
