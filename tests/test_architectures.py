"""Every architecture a TRL user brings scores exactly: with default options, MiniDPOTrainer's per-sequence log-probs,
loss and gradients equal an independent full-logit forward of each sequence alone (the model's own plain forward and
a log-softmax over the whole vocabulary), in both length modes, with precomputed reference log-probs and with LoRA.

The families (tests/families.py) are built tiny from their configs with what changes attention or token mixing
switched on, on multi-turn pairs several times longer than their sliding windows. Which fast path each family takes
(packed pair rows or two rows per pair) is minidpo's decision; these tests only hold it to the reference.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import families
from helpers import shared_path
from records_data import to_trl
from references import seq_logp
from minidpo import scoring
from minidpo.embedded import build_tokenizer, make_preference_records
from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer

BETA = {True: 2.0, False: 0.1}  # by length mode: summed log-ratios are ~50x the averaged ones
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: averaged log-probs are O(10), summed ones O(500) (relative 1e-5)


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return build_tokenizer()


@functools.lru_cache(maxsize=None)
def _records():
    """Three pairs with earlier turns (two assistant turns scored on each side), 70-80 tokens a sequence: several
    times the families' 16-token windows."""
    pool = [to_trl(r) for r in make_preference_records(40, seed=3, multi_turn_fraction=0.6)]
    return tuple(r for r in pool if sum(m["role"] == "assistant" for m in r["prompt"]) == 1)[:3]


def _model(family, seed, tok=None):
    tok = tok or _tokenizer()
    if family == "minimind3-import":
        return _minimind_import(seed)
    return families.build(family, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed=seed)


@functools.lru_cache(maxsize=None)
def _minimind_dir():
    """MiniMind-3's tiny checkpoint imported from its .pth by minidpo (a Qwen3-shaped model), with its tokenizer."""
    import tempfile

    from minidpo.minimind import import_minimind

    out = tempfile.mkdtemp(prefix="minimind3-import-")
    import_minimind(shared_path("minimind-checkpoints", "minimind3-tiny.pth"), shared_path("tokenizers", "minimind3"),
                    out)
    return out


def _minimind_import(seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_minimind_dir(), dtype=torch.float32)
    if seed:  # the policy: moved off the checkpoint so the log-ratios are not 0
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _tok_for(family):
    if family == "minimind3-import":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(_minimind_dir())
    return _tokenizer()


def _trainer(tmp_path, family, trainer_class=MiniDPOTrainer, lora=False, **options):
    tok = _tok_for(family)
    data = list(_records())
    beta = BETA[options.get("length_normalize", True)]
    args = MiniDPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(data), beta=beta,
                         report_to="none", max_length=512, **options)
    ref = None if (lora or args.precompute_ref_log_probs) else _model(family, seed=0, tok=tok)
    policy = _model(family, seed=0 if (lora or args.precompute_ref_log_probs) else 1, tok=tok)
    peft_config = None
    if lora:
        from peft import LoraConfig

        # every linear layer, but the Mamba mixers' where there are some (PEFT refuses those)
        mamba = any(name.endswith("conv1d") for name, _ in policy.named_modules())
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                 exclude_modules=r".*\.(in_proj|out_proj|conv1d)" if mamba else None)
    trainer = trainer_class(policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(data),
                            processing_class=tok, peft_config=peft_config)
    if lora:  # LoRA starts as the identity (B = 0): move B so the adapter changes the log-probs
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return trainer


def _independent(policy, reference, encoded, average, beta=BETA[True]):
    """Per-pair policy and reference log-probs of chosen and rejected (full-logit forwards of each sequence alone)
    and the sigmoid DPO loss over them: the seed's formula, no TRL or minidpo code."""
    logps, losses = [], []
    for e in encoded:
        pc, pr = (seq_logp(policy, e[f"{s}_input_ids"], e[f"{s}_loss_mask"], average) for s in ("chosen", "rejected"))
        with torch.no_grad():
            rc, rr = (seq_logp(reference, e[f"{s}_input_ids"], e[f"{s}_loss_mask"], average)
                      for s in ("chosen", "rejected"))
        logps.append(torch.stack([pc, pr, rc, rr]).detach())
        losses.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
    return torch.stack(logps), torch.stack(losses).mean()


class _Reference:
    """The independent side for a trainer: the policy and reference as plain models, with the trainer's weights."""

    def __init__(self, trainer, family, precompute, lora):
        self.model = trainer.model
        if lora:  # the same PEFT model, plain forwards: adapter on for the policy, off for the reference
            self.policy, self.reference = trainer.model, _AdapterOff(trainer.model)
        else:
            self.policy = _model(family, seed=0 if precompute else 1, tok=_tok_for(family))
            self.reference = _model(family, seed=0, tok=_tok_for(family))
        for m in (self.policy, self.reference):
            m.train(trainer.model.training)
            for module in m.modules():  # as the trainer does (disable_dropout)
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0


class _AdapterOff(torch.nn.Module):
    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


def check_against_reference(trainer, family, average=True, precompute=False, lora=False):
    """Per-sequence log-probs, loss and gradients of `trainer` equal the independent reference's."""
    encoded = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(encoded)
    trainer.model.train()
    ref = _Reference(trainer, family, precompute, lora)

    with torch.no_grad():  # the scoring path alone, through TRL's own reference scorer (LoRA: adapter off)
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    got_grads = {n: _grad(p) for n, p in trainable.items()}
    trainer.model.zero_grad()

    expected_logps, expected_loss = _independent(ref.policy, ref.reference, encoded, average, trainer.beta)
    if trainer.aux_loss_enabled:  # MoE: the router's load-balancing loss, as the model's own forward computes it
        aux = ref.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_router_logits=True).aux_loss
        expected_loss = expected_loss + trainer.router_aux_loss_coef * aux
    expected_loss.backward()
    scored = slice(2, 4) if lora else slice(0, 2)
    torch.testing.assert_close(torch.stack([chosen, rejected], 1), expected_logps[:, scored], **TOL)
    if precompute:
        stored = torch.tensor([[e["ref_chosen_logps"], e["ref_rejected_logps"]] for e in encoded])
        torch.testing.assert_close(stored, expected_logps[:, 2:], **TOL)
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), **TOL)
    names = dict(ref.policy.named_parameters())
    expected_grads = {name: _grad(names[name]) for name in got_grads}
    # float32 rounding of the largest entries; a gradient that is zero in exact arithmetic (a key bias: softmax is
    # shift-invariant) is compared at a tenth of the model's largest gradient
    overall = max(g.abs().max().item() for g in expected_grads.values())
    for name, g in got_grads.items():
        expected = expected_grads[name]
        scale = max(expected.abs().max().item(), 0.1 * overall)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert any(g.abs().sum() > 0 for g in got_grads.values())


def _grad(p):
    """A parameter's gradient, zeros when nothing reached it (an expert no token was routed to)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


FAMILIES = [*families.FAMILIES, "minimind3-import"]
MODES = {
    "averaged": dict(options={}, average=True),
    "summed": dict(options={"length_normalize": False}, average=False),
    "precompute": dict(options={"precompute_ref_log_probs": True}, average=True, precompute=True),
    "lora": dict(options={}, average=True, lora=True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_default_options_score_exactly(tmp_path, family, mode):
    spec = MODES[mode]
    trainer = _trainer(tmp_path, family, lora=spec.get("lora", False), **spec["options"])
    check_against_reference(trainer, family, average=spec["average"], precompute=spec.get("precompute", False),
                            lora=spec.get("lora", False))


def test_every_packed_family_is_in_the_matrix():
    """A model type enters the packed-row list only with a family here that proves it."""
    tested = {families.FAMILIES[f][0] for f in families.FAMILIES} | {"qwen3"}  # minimind3-import is a qwen3
    assert scoring.PACKED_ROW_FAMILIES <= tested


def test_the_matrix_covers_what_changes_attention_or_mixing():
    """Windows shorter than the sequences, sinks, softcapping, ALiBi, NoPE, SSM / conv / linear attention, MoE."""
    lengths = [len(r[f"{s}_input_ids"]) for r in _trainer_free_encoded() for s in ("chosen", "rejected")]
    assert min(lengths) > 4 * families.WINDOW
    assert len(FAMILIES) >= 20
    for feature in ("sliding", "sinks", "softcap", "alibi", "nope", "mamba", "conv", "linear", "moe"):
        assert any(feature in f for f in FAMILIES), feature


def _trainer_free_encoded():
    from minidpo.masking import encode_pair

    return [encode_pair(r, _tokenizer()) for r in _records()]


@pytest.mark.parametrize("family", ["falcon-h1", "lfm2-conv", "bloom", "gpt-oss-sinks"])
def test_packing_where_not_proven_would_be_caught(tmp_path, monkeypatch, family):
    """The guard behind the packed-row list: forced onto families it excludes (or, for GPT-OSS, with the pair
    attention's sink handling removed), packing either stops with one line (a layer mixed tokens outside the pair
    attention) or moves the log-probs far beyond the tolerance: the matrix above would fail, not pass."""
    if family == "gpt-oss-sinks":
        real = scoring._attend
        monkeypatch.setattr(scoring, "_attend", lambda *a, **k: real(*a, **{**k, "sinks": None}))
    else:
        monkeypatch.setattr(scoring, "PACKED_ROW_FAMILIES", scoring.PACKED_ROW_FAMILIES | {
            families.FAMILIES[family][0]})
    trainer = _trainer(tmp_path, family)
    encoded = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(encoded)
    try:
        with torch.no_grad():
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    except RuntimeError as e:
        assert "pair-attention calls for 2 layers" in str(e)
        return
    expected, _ = _independent(trainer.model, trainer.model, encoded, True)
    assert (torch.stack([chosen, rejected], 1) - expected[:, :2]).abs().max() > 1e-3


class _SwappedTrainer(MiniDPOTrainer):
    """What TRL's own tests cannot see: a trainer that prefers the rejected answer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = inputs["input_ids"].size(0) // 2
        swap = {k: torch.cat([v[n:], v[:n]]) if torch.is_tensor(v) and v.size(0) == 2 * n else v
                for k, v in inputs.items()}
        return super().compute_loss(model, swap, return_outputs, num_items_in_batch)


def test_a_trainer_with_chosen_and_rejected_swapped_fails_the_matrix(tmp_path):
    trainer = _trainer(tmp_path, "llama", trainer_class=_SwappedTrainer)
    with pytest.raises(AssertionError):
        check_against_reference(trainer, "llama")
