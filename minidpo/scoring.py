"""How a pair batch `[chosen; rejected]` is scored: packed pair rows, pair attention and a compact LM head.

`install_pair_forward` wraps the fused LM-head forward TRL adds to the model (`model(..., labels=,
fused_lm_head=True)` returns per-token log-probs, no full-vocabulary logits). Three things change, each keeping the
values TRL reads (tests/test_trainer.py and tests/test_scoring.py check loss and gradients against full-logit
references; docs/performance.md has what each gains):

  - length averaging: per-token log-probs are divided by the sequence's scored-token count, so TRL's sum over a
    sequence becomes the mean MiniMind uses (`length_normalize`);
  - packed pair rows (`share_prompt`): a pair runs as one row holding its shared prompt once, then the chosen
    answer, then the rejected answer. `pair_attention` runs it as two attention calls per row (chosen: plain causal;
    rejected: the prompt plus itself, causally), so no square block mask is built: the two calls cover ~40% fewer
    query-key pairs than one square masked call (the CPU flash kernel computes a causal call up to 512 keys in
    full; longer ones and GPU kernels also skip the upper half);
  - compact head on devices without Triton: TRL's fused head scores every position there (its Triton kernels only
    exist for CUDA/XPU) with a dozen elementwise passes over each [tokens, vocab] tile. `_ScoredLogProbs` projects
    only the scored positions and folds each tile in one log-softmax.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from trl.trainer.utils import FusedCausalLMOutput

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# What DPOTrainer asks of the policy's fused head (its loss and the entropy / logits / accuracy metrics).
COMPACT_FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1")
PAIR_ATTENTION = "minidpo_pair_sdpa"
# Part of every cache key of scored values (reference log-probs): bump it whenever the same model and pairs would
# score differently (2: pair attention with windows, softcapping and sinks; packed rows only for proven families).
SCORING_VERSION = "minidpo.scoring/2"
# Set by `log_probs_only()`: forwards whose caller reads nothing but the log-probs (the reference precompute).
_LOG_PROBS_ONLY = contextvars.ContextVar("minidpo_log_probs_only", default=False)
# Set by `recorded_outputs()`: the list the pair forwards append their outputs to.
_SEEN = contextvars.ContextVar("minidpo_recorded_outputs", default=None)
# [tokens, vocab] elements of one fp32 logits tile in the compact head (64 MiB): bounds its memory for any vocabulary.
_TILE_ELEMENTS = 1 << 24


def install_pair_forward(model, length_normalize: bool = True, share_prompt: bool = False,
                         outputs: tuple[str, ...] = ("log_probs",)) -> str | None:
    """Wrap the fused LM head (`model(..., labels=, fused_lm_head=True)`) for pair batches `[chosen; rejected]`.

    `outputs`: the per-token fields the caller asked TRL's head for. Rows to score are found from the labels TRL
    passes (-100 = not scored), which are exactly our loss masks. Returns why packed pair rows are off for this
    model (`packed_rows_refusal`), None when `share_prompt` packs them.
    """
    fused_forward = model.forward
    refusal = packed_rows_refusal(model) if share_prompt else "share_prompt is off"
    share_prompt = refusal is None
    plain_head = _plain_lm_head(model)
    text_config = model.config.get_text_config()

    @functools.wraps(fused_forward)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, labels=labels, shift_labels=shift_labels, **kwargs)
        if args or shift_labels is not None:  # positional inputs, pre-shifted labels (context parallelism): TRL's path
            out = fused_forward(*args, fused_lm_head=True, labels=labels, shift_labels=shift_labels, **kwargs)
        else:
            if getattr(text_config, "output_router_logits", False):
                kwargs.setdefault("output_router_logits", True)  # as TRL's head does: MoE configs that ask for it
            fields = ("log_probs",) if _LOG_PROBS_ONLY.get() else outputs
            compact = plain_head and set(fields) <= set(COMPACT_FIELDS) and labels.device.type not in ("cuda", "xpu")
            head = (functools.partial(_compact_head_forward, model, fields) if compact
                    else functools.partial(fused_forward, fused_lm_head=True))
            # Two rows instead of packed ones (same values, slower) where packing would change something: a MoE
            # router's load-balancing loss counts every routed token, so packing would count the shared prompt once
            # instead of twice; activation checkpointing recomputes each layer after this forward has put the
            # attention back, and recomputing it unpacked would not match what the forward saved.
            pack = (share_prompt and not kwargs.get("output_router_logits")
                    and not getattr(model, "is_activation_checkpointing", False) and _can_share(kwargs))
            packed = _pack_pairs(kwargs, labels) if pack else None
            out = head(labels=labels, **kwargs) if packed is None else _packed_forward(model, head, packed, labels,
                                                                                       kwargs)
        if length_normalize:
            scored = (shift_labels if shift_labels is not None else labels[:, 1:]) != -100
            averaged = out.log_probs / scored.sum(dim=-1, keepdim=True).clamp(min=1)
            if getattr(out, "log_sum_sq_probs", None) is not None:
                # WPO's weight is exp(mean over the row of log p - log sum p^2), which TRL takes as that row's sum
                # over its length: shift the field by what averaging took off log p, so the difference stays per token
                out.log_sum_sq_probs = out.log_sum_sq_probs - (out.log_probs - averaged).detach()
            out.log_probs = averaged
        seen = _SEEN.get()
        if seen is not None:
            seen.append(out)
        return out

    model.forward = forward
    return refusal


@contextlib.contextmanager
def recorded_outputs():
    """The fused-head outputs of the pair forwards run inside, in call order (in TRL's loss the policy's first),
    as the loss reads them (averaged when length-normalizing)."""
    seen = []
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


@contextlib.contextmanager
def log_probs_only():
    """Pair forwards inside compute only `log_probs`, not the metrics (entropy, mean logits, top-1) of the policy.

    The reference precompute runs the policy model and reads nothing else; on CPU the metrics are a third of the
    compact head's element-wise work."""
    token = _LOG_PROBS_ONLY.set(True)
    try:
        yield
    finally:
        _LOG_PROBS_ONLY.reset(token)


def _plain_lm_head(model) -> bool:
    """No logit scaling or softcapping (Llama, Qwen, MiniMind...): the compact head computes exactly TRL's values."""
    config = model.config.get_text_config()
    scale = [getattr(config, k, None) for k in ("logit_scale", "output_multiplier", "lm_head_multiplier",
                                                 "logits_scaling")]
    return getattr(config, "final_logit_softcapping", None) is None and all(s in (None, 1, 1.0) for s in scale)


# ------------------------------------------------------------------------------------------------ packed pair rows

# Model types whose every layer mixes tokens only through Transformers' attention interface, with positions read from
# `position_ids` (RoPE, learned absolute, or none): `pair_attention` reproduces their attention exactly, sliding
# windows, softcapping and sinks included. tests/test_architectures.py proves each one against a plain forward of every
# sequence alone; add a type here only with its entry there. The others keep two rows per pair: ALiBi families (Bloom,
# MPT, Falcon) add position biases outside the interface, and Mamba, short-conv or linear-attention layers (Nemotron-H,
# Falcon-H1, Jamba, Bamba, LFM2, Qwen3-Next) would carry the chosen answer's state into the rejected one.
PACKED_ROW_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "cohere", "cohere2", "phi3", "gpt2", "opt", "smollm3", "olmo2", "gpt_oss", "deepseek_v3",
})
# Set by `_packed_forward` for the attention calls of one packed forward: the rows' layout and a count of the calls.
_PAIR_LAYOUT = contextvars.ContextVar("minidpo_pair_layout", default=None)


def packed_rows_refusal(model) -> str | None:
    """Why packed pair rows would not be exact for `model` (None: they are)."""
    config = model.config
    text_config = config.get_text_config()
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} (packed rows run on sdpa or eager)"
    if text_config is not config:
        return f"{config.model_type} wraps a language model (packed rows are proven for causal LMs only)"
    if config.model_type not in PACKED_ROW_FAMILIES:
        return (f"model type {config.model_type!r} is not among the families proven exact with packed rows "
                "(docs/coming-from-trl.md, Architectures)")
    return None


def _can_share(kwargs) -> bool:
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    return (ids is not None and mask is not None and mask.dim() == 2 and ids.size(0) % 2 == 0
            and "position_ids" not in kwargs and "inputs_embeds" not in kwargs)


def _pack_pairs(kwargs, labels):
    """One row per pair: `chosen + [last shared token] + rejected tail`, the shared prompt once.

    With p the length of the common prefix of chosen c and rejected r, the row is c[:Lc] followed by r[p-1:Lr]. The
    copy of r[p-1] (the shared prompt's last token) re-predicts r's first own token. Positions restart at p-1 for
    the rejected part, which attends to c[:p-1] and to itself (`pair_attention`), never to the chosen tail: every
    token sees exactly what it sees in its own sequence. Right padding (PairCollator, TRL) is assumed; None when the
    batch does not fit that layout.
    """
    input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
    n = input_ids.size(0) // 2
    lengths = attention_mask.sum(dim=1).tolist()
    same = (input_ids[:n] == input_ids[n:]) & attention_mask[:n].bool() & attention_mask[n:].bool()
    prefix = same.int().cumprod(dim=1).sum(dim=1).tolist()
    right_padded = attention_mask.cumprod(dim=1).sum(dim=1).tolist() == lengths
    if min(prefix) < 1 or not right_padded:
        return None
    dev = input_ids.device
    layout = tuple((lengths[i], prefix[i], lengths[i] + lengths[n + i] - prefix[i] + 1) for i in range(n))
    width = max(end for _, _, end in layout)
    ids = input_ids.new_zeros(n, width)
    pos = torch.zeros(n, width, dtype=torch.long, device=dev)
    lab = torch.full((n, width), -100, dtype=labels.dtype, device=dev)
    # index of the packed hidden state that predicts each label of the [chosen; rejected] layout
    src = torch.zeros(2 * n, input_ids.size(1) - 1, dtype=torch.long, device=dev)
    t = torch.arange(input_ids.size(1) - 1, device=dev)
    for i, (lc, p, end) in enumerate(layout):
        lr = lengths[n + i]
        ids[i, :lc], ids[i, lc:end] = input_ids[i, :lc], input_ids[n + i, p - 1:lr]
        pos[i, :lc], pos[i, lc:end] = torch.arange(lc, device=dev), torch.arange(p - 1, lr, device=dev)
        lab[i, :lc], lab[i, lc + 1:end] = labels[i, :lc], labels[n + i, p:lr]
        src[i] = t.clamp(max=width - 2)
        src[n + i] = torch.where(t < p - 1, t, lc + t - p + 1).clamp(max=width - 2)
    mask = torch.arange(width, device=dev)[None, :] < torch.tensor([end for _, _, end in layout], device=dev)[:, None]
    return {"input_ids": ids, "attention_mask": mask.long(), "position_ids": pos, "labels": lab, "src": src,
            "layout": layout}


def _packed_forward(model, head, packed, labels, kwargs):
    """Score the packed rows with the pair attention; per-token outputs back in the `[chosen; rejected]` layout."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PAIR_ATTENTION  # read by every attention layer during this forward only
    calls = [0]
    token = _PAIR_LAYOUT.set((packed["layout"], calls))
    try:
        out = head(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                   position_ids=packed["position_ids"], labels=packed["labels"], **kwargs)
    finally:
        _PAIR_LAYOUT.reset(token)
        config._attn_implementation = previous
    layers = config.get_text_config().num_hidden_layers
    if calls[0] != layers:  # a layer mixed tokens some other way: its values would be wrong, never return them
        raise RuntimeError(f"packed pair rows: {calls[0]} pair-attention calls for {layers} layers in "
                           f"{config.model_type}; set share_prompt: false and report this model type")
    scored = labels[:, 1:] != -100
    n = labels.size(0) // 2
    packed_row = torch.arange(2 * n, device=labels.device) % n
    src = packed["src"]
    for name in PER_TOKEN_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, value[packed_row[:, None], src].masked_fill(~scored, 0))
    out.label_mask = scored
    if getattr(out, "loss", None) is not None:
        out.loss = -out.log_probs.sum() / scored.sum().clamp(min=1)
    return out


def pair_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                   softcap=None, s_aux=None, **kwargs):
    """Attention over packed pair rows (`_pack_pairs`), exact for the layer's sliding window, logit softcapping
    (Gemma 2) and sinks (GPT-OSS).

    The chosen part is causal attention over itself. The rejected part attends to the shared prompt without its
    last token (`[:p-1]`) and causally to itself, at the positions it has in its own sequence (`p-1` onwards), so a
    window cuts exactly what it cuts there. Padding after the row end gets zeros. Outside a packed forward, this is
    Transformers' sdpa.
    """
    state = _PAIR_LAYOUT.get()
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, **kwargs)
    layout, calls = state
    calls[0] += 1
    attend = functools.partial(_attend, module, scaling=scaling, dropout=dropout if module.training else 0.0,
                               softcap=softcap, sinks=s_aux)
    width, dev = query.size(2), query.device
    rows = []
    for i, (lc, p, end) in enumerate(layout):
        q, k, v = query[i:i + 1], key[i:i + 1], value[i:i + 1]
        own = torch.arange(lc, device=dev)
        chosen = attend(q[:, :, :lc], k[:, :, :lc], v[:, :, :lc], _visible(own, own, sliding_window))
        m = end - lc
        rejected = attend(q[:, :, lc:end], torch.cat([k[:, :, :p - 1], k[:, :, lc:end]], dim=2),
                          torch.cat([v[:, :, :p - 1], v[:, :, lc:end]], dim=2),
                          _visible(torch.arange(p - 1, p - 1 + m, device=dev), torch.arange(p - 1 + m, device=dev),
                                   sliding_window))
        rows.append(torch.cat([chosen, rejected, query.new_zeros(1, query.size(1), width - end, value.size(-1))],
                              dim=2))
    # Concatenated in sdpa's layout and transposed once: writing each part into a [batch, width, heads, dim] buffer
    # is slower, the backward then reading transposed gradients (commit cd23180).
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _visible(query_pos, key_pos, window):
    """Which keys each query sees, by position: causal, and within the window (Transformers' sliding masks keep
    `q - k < window`). None for plain causal attention over aligned positions (sdpa's own causal path)."""
    if window is None or window >= len(key_pos):
        if len(query_pos) == len(key_pos):
            return None
        window = None
    distance = query_pos[:, None] - key_pos[None, :]
    return (distance >= 0) & (distance < window) if window is not None else distance >= 0


def _attend(module, q, k, v, visible, scaling, dropout, softcap, sinks):
    """One attention call: sdpa when nothing else is needed, else the eager maths of the families that softcap their
    scores (Gemma 2) or add a sink logit per head (GPT-OSS), as their own eager attention computes them."""
    groups = getattr(module, "num_key_value_groups", 1)
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None, scale=scaling,
                                              dropout_p=dropout, enable_gqa=groups > 1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) * (q.size(-1) ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is None:
        visible = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(q.size(0), -1, q.size(2), 1)], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return probs.to(v.dtype) @ v


AttentionInterface.register(PAIR_ATTENTION, pair_attention)


# ------------------------------------------------------------------------------------------------ compact LM head

def _compact_head_forward(model, outputs, labels, num_items_in_batch=None, **kwargs):
    """TRL's fused-head forward (same `FusedCausalLMOutput`, MoE load-balancing loss included), projecting only the
    scored positions."""
    kwargs["use_cache"] = False
    backbone = model.base_model(**kwargs)
    hidden = backbone.last_hidden_state[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    lm_head = model.get_output_embeddings()
    fields = _ScoredLogProbs.apply(hidden[mask], lm_head.weight, lm_head.bias, labels[mask], outputs)
    per_token = {}
    for name, value in zip(COMPACT_FIELDS, fields):
        if name in outputs:
            per_token[name] = value.new_zeros(mask.shape).masked_scatter(mask, value)
    loss = -per_token["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None
                                            else num_items_in_batch)
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _load_balancing_loss(model, backbone.router_logits, kwargs.get("attention_mask"))
        loss = loss + getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)


def _load_balancing_loss(model, router_logits, attention_mask):
    """The MoE load-balancing loss of a forward, as the model's own forward and TRL's fused head compute it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # every MoE family's

    config = model.config.get_text_config()
    return load_balancing_loss_func(router_logits, expert_count(model), config.num_experts_per_tok, attention_mask)


def expert_count(model) -> int:
    """The experts a mixture-of-experts model routes tokens to (0 for a dense model), under whichever name its
    family gives the count."""
    config = model.config.get_text_config()
    return next((n for k in ("num_experts", "num_local_experts", "n_routed_experts") if (n := getattr(config, k, 0))),
                0)


class _ScoredLogProbs(torch.autograd.Function):
    """log p(label) of `hidden @ weight.T (+ bias)` rows, in [tokens, vocab] tiles, with TRL's optional metrics.

    The projection runs in the autocast dtype like TRL's head; the softmax statistics in fp32. When all rows fit one
    tile their probabilities are kept for the backward; otherwise it recomputes each tile (memory stays one tile).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, outputs):
        n, vocab = hidden.size(0), weight.size(0)
        step = max(1, _TILE_ELEMENTS // vocab)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        log_z = hidden.new_empty(n, dtype=torch.float32)
        log_probs, entropy, mean_logits = (log_z.new_empty(n) for _ in range(3))
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        keep = step >= n and any(ctx.needs_input_grad[:3])  # probabilities for the backward, when one tile holds all
        recompute = any(ctx.needs_input_grad[:3]) and not keep
        probs = None
        for s in range(0, n, step):
            e = min(s + step, n)
            logits = _logits(hidden[s:e], weight, bias, dtype)
            log_softmax = torch.log_softmax(logits, dim=-1)  # one fused pass; logsumexp alone takes more
            log_probs[s:e] = log_softmax.gather(1, labels[s:e, None])[:, 0]
            if recompute:
                log_z[s:e] = torch.logsumexp(logits, dim=-1)
            if "mean_logits" in outputs:
                mean_logits[s:e] = logits.mean(dim=-1)
            if "is_top1" in outputs:
                is_top1[s:e] = _is_top1(logits, labels[s:e])
            if "entropy" in outputs or keep:
                probs = log_softmax.exp()
            if "entropy" in outputs:
                entropy[s:e] = -torch.linalg.vecdot(probs, log_softmax)
        ctx.save_for_backward(hidden, weight, bias, labels, log_z, probs if keep else None)
        ctx.step, ctx.dtype = step, dtype
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return log_probs, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        hidden, weight, bias, labels, log_z, probs = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        g = grad_log_probs.float()
        weight32 = weight.float()  # once, not per tile (a copy when the weights are bf16)
        for s in range(0, hidden.size(0), ctx.step):
            e = min(s + ctx.step, hidden.size(0))
            # d log p(y) / d logits = onehot(y) - softmax
            if probs is not None:
                grad = probs.mul(-g[:, None])
            else:
                grad = _logits(hidden[s:e], weight, bias, ctx.dtype).sub_(log_z[s:e, None]).exp_().mul_(-g[s:e, None])
            grad[torch.arange(e - s, device=grad.device), labels[s:e]] += g[s:e]
            if need_hidden:
                grad_hidden[s:e] = grad @ weight32
            if need_weight:
                grad_weight = (grad.t() @ hidden[s:e].float() if grad_weight is None
                               else grad_weight.addmm_(grad.t(), hidden[s:e].float()))
            if need_bias:
                grad_bias += grad.sum(dim=0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _is_top1(logits, labels):
    """`logits.argmax(-1) == labels` without an argmax over every row: only rows whose label reaches the row's
    maximum can be top-1, and only those need the argmax (which settles ties the way argmax does)."""
    label_logits = logits.gather(1, labels[:, None])[:, 0]
    top1 = label_logits >= logits.amax(dim=-1)
    rows = top1.nonzero()[:, 0]
    if rows.numel():
        top1[rows] = logits[rows].argmax(dim=-1) == labels[rows]
    return top1


def _logits(hidden, weight, bias, dtype):
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            logits = logits + bias.to(dtype)
    return logits.float()
