"""MiniDPOTrainer's loss equals the seed's formula, computed independently with full-vocabulary logits."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer


def to_trl(record):
    return {"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}


def records(multi_turn: bool, n: int = 4):
    pool = [to_trl(r) for r in make_preference_records(200, seed=3, multi_turn_fraction=0.5)]
    picked = [r for r in pool if (sum(m["role"] == "assistant" for m in r["prompt"]) > 0) == multi_turn]
    return picked[:n]


def perturbed_policy(tok, scale=0.3):
    """Same init as the reference, moved away from it deterministically so the log-ratios are far from 0."""
    model = build_tiny_model(tok, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def seq_logp(model, ids, mask, average):
    """Full-sequence forward, log-softmax over the whole vocabulary, masked sum or mean (the seed's dpo_loss)."""
    ids_t = torch.tensor([ids])
    logits = model(input_ids=ids_t).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids_t[0, 1:, None]).squeeze(1)
    m = torch.tensor(mask[1:], dtype=logp.dtype)
    total = (logp * m).sum()
    return total / m.sum().clamp_min(1e-8) if average else total


def reference_loss(policy, ref, encoded, beta, loss_type, average):
    losses = []
    for e in encoded:
        pc = seq_logp(policy, e["chosen_input_ids"], e["chosen_loss_mask"], average)
        pr = seq_logp(policy, e["rejected_input_ids"], e["rejected_loss_mask"], average)
        with torch.no_grad():
            rc = seq_logp(ref, e["chosen_input_ids"], e["chosen_loss_mask"], average)
            rr = seq_logp(ref, e["rejected_input_ids"], e["rejected_loss_mask"], average)
        delta = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            losses.append(-F.logsigmoid(beta * delta))
        elif loss_type == "hinge":
            losses.append(torch.relu(1 - beta * delta))
        elif loss_type == "ipo":
            if not average:  # TRL's IPO averages per token itself (see its comment); so does the seed
                lc, lr = sum(e["chosen_loss_mask"]), sum(e["rejected_loss_mask"])
                delta = (pc - rc) / lc - (pr - rr) / lr
            losses.append((delta - 1 / (2 * beta)) ** 2)
    return torch.stack(losses).mean()


def trainer_for(tmp_path, tok, data, loss_type, length_normalize, beta, **kw):
    args = MiniDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=len(data), beta=beta, loss_type=[loss_type],
        length_normalize=length_normalize, report_to="none", max_length=kw.pop("max_length", 512), **kw)
    return MiniDPOTrainer(perturbed_policy(tok), ref_model=build_tiny_model(tok, seed=0), args=args,
                          train_dataset=Dataset.from_list(data), processing_class=tok)


@pytest.mark.parametrize("multi_turn", [False, True], ids=["single-turn", "multi-turn"])
@pytest.mark.parametrize("length_normalize", [True, False], ids=["averaged", "summed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_and_gradients_match_independent_formula(tmp_path, multi_turn, length_normalize, loss_type):
    tok = build_tokenizer()
    data = records(multi_turn)
    beta = {"sigmoid": 5.0 if length_normalize else 0.5, "hinge": 2.0 if length_normalize else 0.2, "ipo": 0.5}[loss_type]
    trainer = trainer_for(tmp_path, tok, data, loss_type, length_normalize, beta)
    encoded = [trainer.train_dataset[i] for i in range(len(data))]
    if multi_turn:  # the earlier assistant turn is scored too
        assert all(sum(1 for a, b in zip(e["chosen_loss_mask"], e["chosen_loss_mask"][1:]) if b and not a) >= 2
                   for e in encoded)
    batch = trainer.data_collator(encoded)
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    policy, ref = perturbed_policy(tok), build_tiny_model(tok, seed=0)
    policy.train()
    expected = reference_loss(policy, ref, encoded, beta, loss_type, length_normalize)
    expected.backward()

    if loss_type == "sigmoid":
        assert abs(expected.item() - 0.6931) > 0.1, "beta too small: the loss is near log 2 and proves little"
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    for name, p in policy.named_parameters():
        # fused chunked log-softmax vs full log-softmax: agree to float32 rounding of the largest entries
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(),
                                   msg=f"gradient of {name}")


def test_logged_rewards_are_length_averaged(tmp_path):
    tok = build_tokenizer()
    data = records(False)
    trainer = trainer_for(tmp_path, tok, data, "sigmoid", True, beta=3.0)
    encoded = [trainer.train_dataset[i] for i in range(len(data))]
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, trainer.data_collator(encoded))
    policy, ref = perturbed_policy(tok), build_tiny_model(tok, seed=0)
    with torch.no_grad():
        chosen = [3.0 * (seq_logp(policy, e["chosen_input_ids"], e["chosen_loss_mask"], True)
                         - seq_logp(ref, e["chosen_input_ids"], e["chosen_loss_mask"], True)) for e in encoded]
        logps = [seq_logp(policy, e["rejected_input_ids"], e["rejected_loss_mask"], True) for e in encoded]
    metrics = trainer._metrics["eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(torch.stack(chosen).mean().item(), rel=1e-5)
    assert metrics["logps/rejected"][-1] == pytest.approx(torch.stack(logps).mean().item(), rel=1e-5)
    # the per-token metrics still count tokens, not sequences
    assert 0.0 <= metrics["mean_token_accuracy"][-1] <= 1.0


def test_trains_on_exactly_encode_pair_masks(tmp_path):
    from minidpo.masking import encode_pair

    tok = build_tokenizer()
    data = records(True)
    trainer = trainer_for(tmp_path, tok, data, "sigmoid", True, beta=1.0, max_length=40)
    for i, record in enumerate(data):
        assert trainer.train_dataset[i] == {**encode_pair(record, tok, max_length=40)}


def test_config_rejects_incompatible_losses(tmp_path):
    with pytest.raises(ValueError, match="length_normalize"):
        MiniDPOConfig(output_dir=str(tmp_path), loss_type=["sft"], report_to="none")
    with pytest.raises(ValueError, match="mask_mode"):
        MiniDPOConfig(output_dir=str(tmp_path), mask_mode="all", report_to="none")
    cfg = MiniDPOConfig(output_dir=str(tmp_path), report_to="none")
    assert cfg.length_normalize and cfg.mask_mode == "minimind"
    assert cfg.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
