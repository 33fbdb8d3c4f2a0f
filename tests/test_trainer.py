"""MiniDPOTrainer: its loss, gradients and logged metrics equal the seed's formula computed independently with
full-vocabulary logits, on exactly encode_pair's masks; its speed levers (packed pair rows, one pair per forward,
group_by_length) keep them; its model card carries minidpo's sections."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from records_data import to_trl
from references import EMPTY_THINK_BLOCK, perturbed_policy, post_processing_chat, seq_logp
from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer


def records(multi_turn: bool, n: int = 4):
    pool = [to_trl(r) for r in make_preference_records(200, seed=3, multi_turn_fraction=0.5)]
    picked = [r for r in pool if (sum(m["role"] == "assistant" for m in r["prompt"]) > 0) == multi_turn]
    return picked[:n]


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
        output_dir=str(tmp_path), per_device_train_batch_size=len(data), beta=beta,
        loss_type=[loss_type] if isinstance(loss_type, str) else loss_type,
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


def _scored_token_logps(model, ids, mask):
    """log p and log sum_v p_v^2 of each scored token of one sequence, from full logits (graph kept for log p)."""
    ids_t = torch.tensor([ids])
    log_softmax = torch.log_softmax(model(input_ids=ids_t).logits[0, :-1].float(), dim=-1)
    scored = torch.tensor(mask[1:], dtype=torch.bool)
    logp = log_softmax.gather(1, ids_t[0, 1:, None])[:, 0][scored]
    return logp, torch.logsumexp(2 * log_softmax.detach(), dim=-1)[scored]


def reference_extended_loss(policy, ref, encoded, beta, loss_type, loss_weights=None, use_weighting=False,
                            ld_alpha=None):
    """README's length-averaged sft, WPO and LD-DPO, from full logits: a side's log-prob is (sum over its first
    s = min(Lc, Lr) scored tokens + ld_alpha * sum over the rest) / L (ld_alpha 1 without LD-DPO); WPO weighs each
    pair's loss by w_c * w_r, w = exp(mean over scored tokens of log p - log sum p^2); sft is minus the mean
    over pairs of the chosen side's averaged log-prob (times the mean of w_c * w_r under WPO)."""
    def side_logps(model, e):
        sides = [_scored_token_logps(model, e[f"{s}_input_ids"], e[f"{s}_loss_mask"]) for s in ("chosen", "rejected")]
        shared = min(len(lp) for lp, _ in sides)
        alpha = 1.0 if ld_alpha is None else ld_alpha
        logps = [(lp[:shared].sum() + alpha * lp[shared:].sum()) / len(lp) for lp, _ in sides]
        weights = [torch.exp((lp.detach() - lss).mean()) for lp, lss in sides]
        return logps, [lp.mean() for lp, _ in sides], weights

    dpo, sft, pair_weights = [], [], []
    for e in encoded:
        (pc, pr), (avg_c, _), (wc, wr) = side_logps(policy, e)
        with torch.no_grad():
            (rc, rr), _, _ = side_logps(ref, e)
        pair_weight = wc * wr if use_weighting else torch.tensor(1.0)
        dpo.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))) * pair_weight)
        sft.append(-avg_c)
        pair_weights.append(pair_weight)
    terms = {"sigmoid": torch.stack(dpo).mean(), "sft": torch.stack(sft).mean() * torch.stack(pair_weights).mean()}
    return sum(w * terms[t] for t, w in zip(loss_type, loss_weights or [1.0] * len(loss_type)))


@pytest.mark.parametrize("options", [
    {"loss_type": ["sft"]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3], "use_weighting": True},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sft_wpo_and_ld_dpo_length_averaged_match_independent_formula(tmp_path, options):
    tok = build_tokenizer()
    data = records(True)
    beta = 5.0
    trainer = trainer_for(tmp_path, tok, data, length_normalize=True, beta=beta, **options)
    encoded = [trainer.train_dataset[i] for i in range(len(data))]
    lengths = [(sum(e["chosen_loss_mask"]), sum(e["rejected_loss_mask"])) for e in encoded]
    assert any(c != r for c, r in lengths), "LD-DPO's shared part would be the whole of both sides"
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, trainer.data_collator(encoded))
    loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    policy, ref = perturbed_policy(tok), build_tiny_model(tok, seed=0)
    policy.train()
    expected = reference_extended_loss(policy, ref, encoded, beta, **options)
    expected.backward()

    if {"use_weighting", "ld_alpha"} & set(options):  # else the option changes nothing here and proves nothing
        plain = reference_extended_loss(policy, ref, encoded, beta, options["loss_type"], options.get("loss_weights"))
        assert abs(plain.item() - expected.item()) > 1e-3
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(),
                                   msg=f"gradient of {name}")


def _teach(model, encoded, steps=3):
    """A few language-modelling steps on the chosen sequences, so the model predicts some of their tokens (a
    random model predicts none, and token accuracy would prove nothing)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        for e in encoded:
            ids = torch.tensor([e["chosen_input_ids"]])
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_logged_metrics_are_length_averaged(tmp_path):
    tok = build_tokenizer()
    data = records(False)
    trainer = trainer_for(tmp_path, tok, data, "sigmoid", True, beta=3.0)
    encoded = [trainer.train_dataset[i] for i in range(len(data))]
    policy, ref = trainer.model, build_tiny_model(tok, seed=0)
    _teach(policy, encoded)
    policy.eval()
    with torch.no_grad():
        trainer.compute_loss(policy, trainer.data_collator(encoded))
        chosen = [3.0 * (seq_logp(policy, e["chosen_input_ids"], e["chosen_loss_mask"], True)
                         - seq_logp(ref, e["chosen_input_ids"], e["chosen_loss_mask"], True)) for e in encoded]
        logps = [seq_logp(policy, e["rejected_input_ids"], e["rejected_loss_mask"], True) for e in encoded]
    metrics = trainer._metrics["eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(torch.stack(chosen).mean().item(), rel=1e-5)
    assert metrics["logps/rejected"][-1] == pytest.approx(torch.stack(logps).mean().item(), rel=1e-5)
    # the per-token metrics still count tokens, not sequences: top-1 hits over every scored chosen token
    hits = scored = 0
    with torch.no_grad():
        for e in encoded:
            ids, mask = torch.tensor(e["chosen_input_ids"]), torch.tensor(e["chosen_loss_mask"][1:], dtype=torch.bool)
            predicted = policy(input_ids=ids[None]).logits[0, :-1].argmax(-1)
            hits += (predicted == ids[1:])[mask].sum().item()
            scored += mask.sum().item()
    assert 0 < hits < scored, "a policy that predicts none or all of the tokens cannot tell token from sequence counts"
    assert metrics["mean_token_accuracy"][-1] == pytest.approx(hits / scored, rel=1e-6)


def test_trains_on_exactly_encode_pair_masks(tmp_path):
    from minidpo.masking import encode_pair

    tok = build_tokenizer()
    data = records(True)
    trainer = trainer_for(tmp_path, tok, data, "sigmoid", True, beta=1.0, max_length=40)
    for i, record in enumerate(data):
        assert trainer.train_dataset[i] == {**encode_pair(record, tok, max_length=40)}


def test_config_rejects_incompatible_losses(tmp_path):
    with pytest.raises(ValueError, match="mask_mode"):
        MiniDPOConfig(output_dir=str(tmp_path), mask_mode="all", report_to="none")
    cfg = MiniDPOConfig(output_dir=str(tmp_path), report_to="none")
    assert cfg.length_normalize and cfg.mask_mode == "minimind"


@pytest.mark.parametrize("cuda,bf16_supported,expected", [(False, False, False), (True, True, True),
                                                           (True, False, False)])
def test_bf16_by_default_only_where_the_gpu_has_it(monkeypatch, cuda, bf16_supported, expected):
    from minidpo import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert config._default_bf16() is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only defaults")
def test_cpu_defaults_start_without_flags(tmp_path):
    """Stock TRL defaults to bf16 and refuses a CPU without `use_cpu`; MiniDPOConfig trains in fp32 there, with
    use_cpu (a launcher's processes then form one gloo group) and without pinned memory; `bf16: true` is CPU
    autocast."""
    cfg = MiniDPOConfig(output_dir=str(tmp_path), report_to="none")
    assert cfg.bf16 is False and cfg.use_cpu is True and not cfg.activation_checkpointing
    assert cfg.dataloader_pin_memory is False
    assert MiniDPOConfig(output_dir=str(tmp_path), report_to="none", bf16=True).use_cpu is True


def test_bf16_reference_forward_runs_under_autocast_like_the_policy(tmp_path):
    """The reference of a bf16 run scored per step runs under autocast, as the policy and a precomputed reference
    do: the pair forward installed over Accelerate's autocast wrapper once reached the compact head (CPU) past it, so
    the reference ran in fp32."""
    tok = build_tokenizer()
    policy, ref = perturbed_policy(tok), build_tiny_model(tok)
    seen = {"policy": set(), "reference": set()}
    for role, model in (("policy", policy), ("reference", ref)):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda _m, _i, out, role=role: seen[role].add(out.dtype))
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2, max_steps=1,
                         max_length=128, save_strategy="no", disable_tqdm=True, bf16=True)
    MiniDPOTrainer(policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(records(False, 2)),
                   processing_class=tok).train()
    assert seen == {"policy": {torch.bfloat16}, "reference": {torch.bfloat16}}, seen


@pytest.mark.parametrize("options,words", [
    ({"beta": 0.0}, "beta must be > 0, got 0.0"),
    ({"beta": -0.1}, "beta must be > 0, got -0.1"),
    ({"learning_rate": -1e-5}, "learning_rate must be > 0"),
    ({"label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
    ({"loss_type": ["exo_pair"]}, "exo_pair needs label_smoothing > 0"),
    ({"max_length": 1}, "max_length must be at least 2"),
    ({"empty_think_keep_ratio": 1.5}, "empty_think_keep_ratio must be in [0, 1]"),
    ({"minimind_num_workers": -1}, "minimind_num_workers must be >= 0"),
    ({"empty_think_keep_ratio": 0.2}, "set minimind_data_order: true"),
    ({"empty_think_keep_ratio": 0.2, "minimind_data_order": True, "mask_mode": "last-turn"}, "set mask_mode: minimind"),
    ({"empty_think_keep_ratio": 0.2, "minimind_data_order": True, "precompute_ref_log_probs": True},
     "set precompute_ref_log_probs: false"),
], ids=lambda x: str(x) if isinstance(x, dict) else "")
def test_values_out_of_range_are_refused_naming_the_option(tmp_path, options, words):
    with pytest.raises(ValueError) as e:
        MiniDPOConfig(output_dir=str(tmp_path), report_to="none", **options)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Speed levers keep the loss


def _loss_and_grads(tmp_path, data, **kw):
    tok = build_tokenizer()
    policy = perturbed_policy(tok)
    args = MiniDPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(data), beta=5.0,
                         report_to="none", max_length=512, **kw)
    trainer = MiniDPOTrainer(policy, ref_model=None if args.precompute_ref_log_probs else build_tiny_model(tok),
                             args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}, trainer


def test_shared_prompt_matches_two_sequences(tmp_path):
    data = [to_trl(r) for r in make_preference_records(8, seed=5, multi_turn_fraction=0.5)]
    loss, grads, _ = _loss_and_grads(tmp_path, data, share_prompt=True)
    ref_loss, ref_grads, _ = _loss_and_grads(tmp_path, data, share_prompt=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


def test_one_pair_per_forward_with_accumulation_is_the_same_update(tmp_path):
    """The bench's minidpo row: batch 1 x accumulation 4 must train exactly like batch 4 (same pairs per step)."""
    data = [to_trl(r) for r in make_preference_records(8, seed=11, multi_turn_fraction=0.5)]
    tok = build_tokenizer()

    def update(batch, accumulation):
        policy = build_tiny_model(tok, seed=0)
        # SGD: the update is the gradient itself (Adam's first step would hide its scale); lr 100 keeps it far above
        # the float32 rounding of the weights.
        start = {n: p.detach().clone() for n, p in policy.named_parameters()}
        args = MiniDPOConfig(output_dir=str(tmp_path / f"b{batch}"), report_to="none", max_length=512, max_steps=2,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             optim="sgd", learning_rate=100.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             train_sampling_strategy="sequential", precompute_ref_log_probs=True,
                             ref_cache_dir=str(tmp_path / "cache"), save_strategy="no", seed=3)
        trainer = MiniDPOTrainer(policy, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
        trainer.train()
        return {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}

    together, accumulated = update(4, 1), update(1, 4)
    for name, delta in together.items():
        assert delta.abs().max() > 0, name
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-5 * delta.abs().max().item(),
                                   msg=name)


def test_group_by_length_sampler(tmp_path):
    data = [to_trl(r) for r in make_preference_records(40, seed=9, multi_turn_fraction=0.5)]
    tok = build_tokenizer()
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                         train_sampling_strategy="group_by_length")
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args,
                             train_dataset=Dataset.from_list(data), processing_class=tok)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(40))
    lengths = [len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in trainer.train_dataset]
    assert lengths[order[0]] == max(lengths)  # the longest batch first, as transformers' sampler does


# ---------------------------------------------------------------------------------------------------------
# Model card


def test_model_card_is_trls_plus_minidpos_sections_without_a_local_dataset_path(tmp_path):
    """create_model_card is what Trainer calls at every checkpoint and in push_to_hub: each call rewrites TRL's card
    and appends minidpo's sections once; a local dataset path stays out of the card's `datasets:` metadata."""
    tok = build_tokenizer()
    trainer = trainer_for(tmp_path / "out", tok, records(False), "sigmoid", True, beta=1.0)
    trainer.data_source, trainer.lines_rejected = str(tmp_path / "dpo.jsonl"), 3
    for _ in range(2):
        trainer.create_model_card(model_name="tiny-dpo", dataset_name=str(tmp_path))
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    front_matter = card.split("---")[1]
    assert "library_name: transformers" in front_matter and "minidpo" in front_matter  # TRL's card, our tag
    assert str(tmp_path) not in front_matter
    assert card.count("## minidpo") == 1
    assert f"data `{tmp_path / 'dpo.jsonl'}`" in card
    assert "| `lines rejected on load` | 3 |" in card and "| `length_normalize` | True |" in card


# ---------------------------------------------------------------------------------------------------------
# Drop-in for TRL: every dataset layout, loss option and model family DPOTrainer takes. The independent reference is
# stock TRL itself: where minidpo scores what TRL scores (standard text, last-turn conversations), the batches match
# TRL's token for token, and with summed log-ratios the losses match TRL's.

TOOL_TEMPLATE = (  # ChatML with tools and a chat_template_kwargs switch, as TRL's tests use
    "{%- if tools -%}{{- '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + (m.role | upper if shout else m.role) + '\\n' + m.content"
    " + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>' + ('ASSISTANT' if shout else 'assistant') + '\\n' -}}"
    "{%- endif -%}")


def _standard(n=4, seed=3):
    """Plain-text preference records (TRL's standard format) from the embedded generator's conversations."""
    out = []
    for r in make_preference_records(n, seed=seed, multi_turn_fraction=0.0, system_fraction=0.0):
        out.append({"prompt": r["chosen"][-2]["content"], "chosen": " " + r["chosen"][-1]["content"],
                    "rejected": " " + r["rejected"][-1]["content"]})
    return out


def _conversational(n=4, seed=3, implicit=False):
    rows = [to_trl(r) for r in make_preference_records(n, seed=seed, multi_turn_fraction=0.0)]
    if implicit:
        return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    return rows


def _stock_and_ours(tmp_path, data, tokenizer=None, model=None, **config):
    """Stock `trl.DPOTrainer` and `MiniDPOTrainer(length_normalize=False)` on the same data, weights and options.
    `model(reference: bool)` builds the policy and the reference (default: the perturbed and the plain tiny Llama)."""
    from trl import DPOConfig, DPOTrainer

    tok = tokenizer or build_tokenizer()
    make = model or (lambda reference: build_tiny_model(tok, seed=0) if reference else perturbed_policy(tok))
    common = dict(per_device_train_batch_size=len(data), report_to="none", max_length=512, beta=0.5, **config)
    stock = DPOTrainer(make(False), ref_model=make(True),
                       args=DPOConfig(output_dir=str(tmp_path / "stock"), use_cpu=True, bf16=False, **common),
                       train_dataset=Dataset.from_list(data), processing_class=tok)
    ours = MiniDPOTrainer(make(False), ref_model=make(True),
                          args=MiniDPOConfig(output_dir=str(tmp_path / "ours"), length_normalize=False,
                                             **{"mask_mode": "last-turn", **common}),
                          train_dataset=Dataset.from_list(data), processing_class=tok)
    return stock, ours


def _batches(stock, ours):
    rows = range(len(stock.train_dataset))
    return (stock.data_collator([stock.train_dataset[i] for i in rows]),
            ours.data_collator([ours.train_dataset[i] for i in rows]))


def _assert_same_tokens(stock, ours):
    a, b = _batches(stock, ours)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(a[key], b[key]), key
    assert a["completion_mask"].sum() > 0


@pytest.mark.parametrize("layout", ["standard", "standard-implicit", "conversational", "conversational-implicit"])
def test_every_layout_scores_what_trl_scores(tmp_path, layout):
    """Standard text: the completion and TRL's appended eos; conversations in last-turn mode: the final answer and its
    end of turn. Implicit prompts are the shared start of chosen and rejected, found as TRL finds it."""
    if layout.startswith("standard"):
        data = _standard()
        if layout.endswith("implicit"):
            data = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in data]
    else:
        data = _conversational(implicit=layout.endswith("implicit"))
    stock, ours = _stock_and_ours(tmp_path, data)
    _assert_same_tokens(stock, ours)
    eos = ours.processing_class.eos_token_id
    if layout.startswith("standard"):
        last = ours.train_dataset[0]["chosen_input_ids"][-1]
        assert last == eos, "TRL appends eos to a plain-text completion"
    assert ours.train_dataset[0]["prompt_ids"] == stock.train_dataset[0]["prompt_ids"]


def test_implicit_conversations_score_every_assistant_turn_in_minimind_mode(tmp_path):
    """minimind mode on an implicit-prompt multi-turn conversation: the prompt found as TRL finds it, then every
    assistant turn scored, exactly as for the same record with the prompt written out."""
    from minidpo.masking import encode_pair

    tok = build_tokenizer()
    explicit = [r for r in (to_trl(r) for r in make_preference_records(40, seed=4, multi_turn_fraction=1.0))][:4]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok),
                             args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none"),
                             train_dataset=Dataset.from_list(implicit), processing_class=tok)
    for i, record in enumerate(explicit):
        assert trainer.train_dataset[i] == encode_pair(record, tok, max_length=1024)
        mask = trainer.train_dataset[i]["chosen_loss_mask"]
        assert sum(1 for a, b in zip(mask, mask[1:]) if b and not a) == 2  # both assistant turns scored


def test_tools_and_chat_template_kwargs_reach_the_template(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    data = [dict(r, tools=json.dumps([tool]), chat_template_kwargs={"shout": bool(i % 2)})
            for i, r in enumerate(_conversational())]
    stock, ours = _stock_and_ours(tmp_path, data, tokenizer=tok)
    _assert_same_tokens(stock, ours)
    text = [tok.decode(ours.train_dataset[i]["chosen_input_ids"]) for i in range(2)]
    assert "get_weather" in text[0] and "<|im_start|>user" in text[0] and "<|im_start|>USER" in text[1]


@pytest.mark.parametrize("options", [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["hinge"]},
    {"loss_type": ["ipo"]},
    {"loss_type": ["sft"]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["robust"], "label_smoothing": 0.1},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_summed_log_ratios_give_trls_loss_for_every_option(tmp_path, options):
    stock, ours = _stock_and_ours(tmp_path, _standard(), **options)
    a, b = _batches(stock, ours)
    stock.model.train(), ours.model.train()
    expected, got = stock.compute_loss(stock.model, a), ours.compute_loss(ours.model, b)
    assert abs(expected.item() - 0.6931) > 1e-3 or options["loss_type"] != ["sigmoid"], "policy == reference"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_router_loss_reaches_the_loss(tmp_path, family):
    """A tiny Qwen3-MoE (`num_experts`) and Mixtral (`num_local_experts`): minidpo's loss (compact head, pairs not
    packed) equals TRL's with the router's load-balancing loss in it, and the aux loss is logged; without the router
    loss the two would differ by coef * aux."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer()
    experts = {"num_experts": 4} if family == "qwen3_moe" else {"num_local_experts": 4}

    def moe(reference):
        config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts_per_tok=2, router_aux_loss_coef=0.5,
                                      pad_token_id=tok.pad_token_id, **experts)
        torch.manual_seed(0 if reference else 1)
        return AutoModelForCausalLM.from_config(config)

    stock, ours = _stock_and_ours(tmp_path, _standard(), model=moe)
    assert ours.aux_loss_enabled
    a, b = _batches(stock, ours)
    stock.model.train(), ours.model.train()
    expected, got = stock.compute_loss(stock.model, a), ours.compute_loss(ours.model, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    aux = ours._metrics["train"]["aux_loss"][-1]
    assert aux > 0 and aux == pytest.approx(stock._metrics["train"]["aux_loss"][-1], rel=1e-5)


def test_iterable_datasets_train_and_refuse_precompute_with_trls_message(tmp_path):
    from datasets import IterableDataset

    tok = build_tokenizer()
    data = _conversational(8)
    stream = IterableDataset.from_generator(lambda: iter(data))
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=2, per_device_train_batch_size=2)
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args, train_dataset=stream,
                             processing_class=tok)
    mapped = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args,
                            train_dataset=Dataset.from_list(data), processing_class=tok)
    assert list(trainer.train_dataset) == [mapped.train_dataset[i] for i in range(len(data))]
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="not supported with IterableDataset"):
        MiniDPOTrainer(build_tiny_model(tok), args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none",
                                                                 max_steps=2, precompute_ref_log_probs=True),
                       train_dataset=stream, processing_class=tok)
    with pytest.raises(ValueError, match="empty_think_keep_ratio < 1 draws along MiniMind's order"):
        MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), processing_class=tok,
                       args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=2,
                                          empty_think_keep_ratio=0.2, minimind_data_order=True), train_dataset=stream)


def test_dicts_of_eval_datasets_are_each_prepared_and_evaluated(tmp_path):
    from datasets import DatasetDict

    tok = build_tokenizer()
    evals = DatasetDict({"short": Dataset.from_list(_conversational(4, seed=5)),
                         "text": Dataset.from_list(_standard(4, seed=6))})
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok),
                             args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none"),
                             train_dataset=Dataset.from_list(_conversational(4)), eval_dataset=evals,
                             processing_class=tok)
    assert set(trainer.eval_dataset) == {"short", "text"}
    metrics = trainer.evaluate()
    # policy == reference before training: every pair's loss is log 2
    assert metrics["eval_short_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert metrics["eval_text_loss"] == pytest.approx(0.6931, abs=1e-4)


def test_dataset_encoding_runs_main_process_first(tmp_path, monkeypatch):
    """Under several processes the main one encodes first and the others find its cache."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def main_process_first(self, local=True, desc="work"):
        entered.append(desc)
        yield

    monkeypatch.setattr(MiniDPOConfig, "main_process_first", main_process_first)
    tok = build_tokenizer()
    MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok),
                   args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none"),
                   train_dataset=Dataset.from_list(_conversational(4)), processing_class=tok)
    assert "encoding the train pairs" in entered


def test_keep_end_truncation_keeps_the_answer(tmp_path):
    tok = build_tokenizer()
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none", max_length=12, truncation_mode="keep_end")
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args,
                             train_dataset=Dataset.from_list(_standard()), processing_class=tok)
    full = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok),
                          args=MiniDPOConfig(output_dir=str(tmp_path), report_to="none"),
                          train_dataset=Dataset.from_list(_standard()), processing_class=tok)
    for i in range(len(trainer.train_dataset)):
        cut, whole = trainer.train_dataset[i], full.train_dataset[i]
        assert cut["chosen_input_ids"] == whole["chosen_input_ids"][-12:]
        assert cut["chosen_loss_mask"] == [0] + whole["chosen_loss_mask"][-11:]
    with pytest.raises(ValueError, match="truncation_mode"):
        MiniDPOConfig(output_dir=str(tmp_path), report_to="none", truncation_mode="keep_middle")


def test_image_datasets_are_refused_with_the_reason(tmp_path):
    """TRL refuses image data for a text model; with a vision-language model minidpo's own check refuses it, since
    its masks are text-only (checked here on the preparation step itself)."""
    tok = build_tokenizer()
    args = MiniDPOConfig(output_dir=str(tmp_path), report_to="none")
    trainer = MiniDPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args,
                             train_dataset=Dataset.from_list(_conversational(2)), processing_class=tok)
    images = Dataset.from_list([dict(r, images=[None]) for r in _conversational(2)])
    with pytest.raises(ValueError, match="image columns found.*trl.DPOTrainer"):
        trainer._prepare_dataset(images, tok, args, "train")


@pytest.mark.parametrize("n", [16, 24])
def test_minimind_order_under_ddp_is_distributed_samplers(n):
    """Several processes: Accelerate deals whole batches round-robin; each rank gets the batches torch's
    DistributedSampler (MiniMind's DDP sampler, seed 0, reshuffled by set_epoch) gives it."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, DistributedSampler

    from minidpo.minimind_recipe import MiniMindOrder

    world, batch = 2, 4
    for epoch in (0, 1):
        order = MiniMindOrder(n, batch, world=world)
        order.set_epoch(epoch)
        for rank in range(world):
            dealt = list(BatchSamplerShard(BatchSampler(order, batch, drop_last=False), num_processes=world,
                                           process_index=rank))
            minimind = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0)
            minimind.set_epoch(epoch)
            share = list(minimind)
            assert dealt == [share[i:i + batch] for i in range(0, len(share), batch)], (epoch, rank)


def test_pad_token_option_pads_as_stock_trl_does(tmp_path):
    """DPOConfig.pad_token: the collator pads with it and the model's config learns it; one the vocabulary lacks is
    refused in one line."""
    tok = build_tokenizer()
    data = records(False)
    args = MiniDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", max_length=512,
                         pad_token=tok.eos_token)
    trainer = MiniDPOTrainer(build_tiny_model(tok, seed=0), ref_model=build_tiny_model(tok, seed=0), args=args,
                             train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == tok.eos_token_id).all()
    assert tok.eos_token_id != build_tokenizer().pad_token_id
    assert trainer.model.config.pad_token_id == tok.eos_token_id
    args.pad_token = "<not-a-token>"
    with pytest.raises(ValueError, match="pad_token '<not-a-token>' is not in the tokenizer's vocabulary"):
        MiniDPOTrainer(build_tiny_model(tok, seed=0), ref_model=build_tiny_model(tok, seed=0), args=args,
                       train_dataset=Dataset.from_list(data), processing_class=build_tokenizer())


def test_tokenizer_is_loaded_at_the_models_revision(tmp_path, monkeypatch):
    """A model named by path with model_init_kwargs' revision gets the tokenizer of that revision, as in stock TRL."""
    from minidpo import trainer as trainer_module

    tok = build_tokenizer(tmp_path / "base")
    build_tiny_model(tok, seed=0).save_pretrained(tmp_path / "base")
    asked = []
    real = trainer_module.load_tokenizer
    monkeypatch.setattr(trainer_module, "load_tokenizer",
                        lambda name, revision=None, **kw: asked.append(revision) or real(name, **kw))
    args = MiniDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=512,
                         model_init_kwargs={"revision": "v1.0"}, precompute_ref_log_probs=False)
    MiniDPOTrainer(str(tmp_path / "base"), args=args, train_dataset=Dataset.from_list(records(False)))
    assert asked == ["v1.0"]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_empty_think_draws_are_minimind_dataloaders(num_workers, world):
    """minimind-3's draws, from its own loop run for real: setup_seed(42 + epoch), randperm, DistributedSampler under
    DDP, torch's DataLoader (its workers seeded by torch), a dataset whose __getitem__ removes the block from each
    side's text as MiniMind's post_processing_chat does. Renders without a block draw nothing."""
    import random

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from minidpo.minimind_recipe import EmptyThinkDraws, MiniMindOrder

    # one process: a last partial batch; two: shares of whole batches (Accelerate splits a partial one its own way)
    n, batch, block = 22 if world == 1 else 24, 4, EMPTY_THINK_BLOCK
    texts = [(f"a{block}b" if i % 3 else "ab", f"c{block}d" if i % 4 != 1 else "cd") for i in range(n)]

    class MiniMindPairs(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            chosen = post_processing_chat(texts[i][0])
            rejected = post_processing_chat(texts[i][1])
            return i, chosen != texts[i][0], rejected != texts[i][1]

    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            for epoch in (0, 1):
                order = MiniMindOrder(n, batch, world=world,
                                      think=EmptyThinkDraws([(block in c, block in r) for c, r in texts], 0.2,
                                                            num_workers))
                order.set_epoch(epoch)
                for rank in range(world):
                    sampler = None
                    if world > 1:
                        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0)
                        sampler.set_epoch(epoch)
                    random.seed(42 + epoch)
                    torch.manual_seed(42 + epoch)
                    indices = torch.randperm(n).tolist()
                    loader = DataLoader(MiniMindPairs(), batch_sampler=list(BatchSampler(sampler or indices, batch,
                                                                                         False)),
                                        num_workers=num_workers, collate_fn=list)
                    expected = [pair for b in loader for pair in b]
                    batches = BatchSampler(order, batch, drop_last=False)
                    if world > 1:  # Accelerate deals batches to the processes only when there are several
                        batches = BatchSamplerShard(batches, num_processes=world, process_index=rank)
                    dealt = [pair for b in batches for pair in b]
                    assert dealt == expected, (epoch, rank)
                    drops = [d for _, *ds in expected for d in ds]
                    assert 0 < sum(drops) < len(drops), "every draw alike proves little"
    finally:
        random.setstate(state)


def test_renders_without_empty_think_blocks_score_minimind_sequences(tmp_path):
    """minimind-3's tokenizer, chosen and rejected each with or without their empty think blocks (in multi-turn
    pairs they then differ inside the prompt): the packed pair rows' loss and gradients equal full-logit ones on
    MiniMind's own sequences and masks (references.minimind_reference after the removal)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from helpers import shared_path
    from references import minimind_reference
    from minidpo.masking import common_prefix
    from minidpo.minimind_recipe import Renders

    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "minimind3"))
    pool = make_preference_records(40, seed=4, multi_turn_fraction=0.5)
    multi = [r for r in pool if sum(m["role"] == "assistant" for m in r["chosen"]) > 1]
    records = multi[:2] + [r for r in pool if r not in multi][:2]
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = Qwen3ForCausalLM(config)
    policy = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p, q in zip(policy.parameters(), ref.parameters()):
            p.copy_(q + 0.3 * torch.randn_like(q))
    expected_policy = Qwen3ForCausalLM(config)
    expected_policy.load_state_dict(policy.state_dict())
    args = MiniDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.05, report_to="none",
                         length_normalize=False, max_length=256, empty_think_keep_ratio=0.2, minimind_data_order=True)
    trainer = MiniDPOTrainer(policy, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list([to_trl(r) for r in records]))
    keys = [(0, True, False), (1, False, True), (2, True, True), (3, False, False)]
    rows = [Renders(trainer.train_dataset)[k] for k in keys]
    assert common_prefix(rows[0]["chosen_input_ids"], rows[0]["rejected_input_ids"]) < len(rows[0]["prompt_ids"])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    loss.backward()

    def strip(text):
        return text.replace(EMPTY_THINK_BLOCK, "")

    def summed(model, record, side, drop):
        x, y, mask = minimind_reference(record[side], tok, 256, strip if drop else None)
        logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0].float(), -1)
        return (logp.gather(1, torch.tensor(y)[:, None])[:, 0] * torch.tensor(mask)).sum()

    losses = []
    for i, drop_chosen, drop_rejected in keys:
        r = records[i]
        with torch.no_grad():
            ref_delta = summed(ref, r, "chosen", drop_chosen) - summed(ref, r, "rejected", drop_rejected)
        delta = (summed(expected_policy, r, "chosen", drop_chosen)
                 - summed(expected_policy, r, "rejected", drop_rejected))
        losses.append(-F.logsigmoid(0.05 * (delta - ref_delta)))
    expected = torch.stack(losses).mean()
    expected.backward()
    assert abs(expected.item() - 0.6931) > 1e-2
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), expected_policy.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=name)
