"""minidpo.scoring against plain references: the compact LM head against full-vocabulary log-softmax, the pair
attention against one sdpa call with the equivalent dense mask."""

import pytest
import torch

from minidpo import scoring

_compact_head_forward = scoring._compact_head_forward


def _full_reference(hidden, weight, bias, labels):
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    logp = torch.log_softmax(logits, dim=-1)
    return (logp.gather(1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1), logits.mean(-1),
            logits.argmax(-1) == labels)


@pytest.mark.parametrize("tile_elements", [1 << 24, 3 * 97])  # one tile (probabilities kept) / 3 rows a tile
@pytest.mark.parametrize("with_bias", [False, True])
def test_compact_head_matches_full_log_softmax(monkeypatch, tile_elements, with_bias):
    monkeypatch.setattr(scoring, "_TILE_ELEMENTS", tile_elements)
    gen = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 11, 16, 97
    tensors = [torch.randn(n, hidden_size, generator=gen, dtype=torch.float64),
               torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64),
               torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None]
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[0] = tensors[2].argmax() if with_bias else labels[0]
    # ours in float32 (what models train in), the reference in float64
    ours = [t.float().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    log_probs, entropy, mean_logits, is_top1 = scoring._ScoredLogProbs.apply(*ours, labels, scoring.COMPACT_FIELDS)
    ref_log_probs, ref_entropy, ref_mean, ref_top1 = _full_reference(*ref, labels)
    torch.testing.assert_close(log_probs, ref_log_probs.float())
    torch.testing.assert_close(entropy, ref_entropy.detach().float())
    torch.testing.assert_close(mean_logits, ref_mean.detach().float())
    assert torch.equal(is_top1, ref_top1)
    with torch.no_grad():  # the reference's forward: nothing kept for a backward, same values
        torch.testing.assert_close(scoring._ScoredLogProbs.apply(*ours, labels, ("log_probs",))[0], log_probs)
    weights = torch.randn(n, generator=gen, dtype=torch.float64)
    (log_probs * weights.float()).sum().backward()
    (ref_log_probs * weights).sum().backward()
    for a, b in zip(ours, ref):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad.float())


def test_compact_head_top1_settles_ties_like_argmax():
    """Equal logits (duplicate vocabulary rows; common once logits are rounded to bf16): a label is top-1 only when
    argmax picks it, i.e. it is the first index reaching the maximum."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(6, 8, generator=gen), torch.randn(10, 8, generator=gen)
    top = (hidden @ weight.t()).argmax(dim=-1)
    weight = torch.cat([weight, weight[top]])  # row 10 + i repeats each row's top-1: ties at the maximum
    labels = torch.tensor([top[0], 10, 11, top[3], 14, 0])
    fields = scoring._ScoredLogProbs.apply(hidden, weight, None, labels, scoring.COMPACT_FIELDS)
    expected = (hidden @ weight.t()).argmax(dim=-1) == labels
    assert torch.equal(fields[3], expected)
    assert expected.any() and not expected.all()


@pytest.mark.parametrize("outputs", [scoring.COMPACT_FIELDS, scoring.COMPACT_FIELDS + ("log_sum_sq_probs",)])
def test_log_probs_only_skips_the_metrics_not_the_values(monkeypatch, outputs):
    """The reference precompute scores with the policy's head: inside `log_probs_only` it gets the same log-probs
    and no metrics, from the compact head even when the policy's own fields (WPO's) need TRL's."""
    from trl.trainer.utils import add_fused_lm_head

    from minidpo.embedded import build_tiny_model, build_tokenizer

    model = build_tiny_model(build_tokenizer(), seed=0)
    add_fused_lm_head(model, outputs=outputs)
    scoring.install_pair_forward(model, share_prompt=True, outputs=outputs)
    compact_calls = []
    monkeypatch.setattr(scoring, "_compact_head_forward",
                        lambda *a, **k: compact_calls.append(a[1]) or _compact_head_forward(*a, **k))
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(4))
    ids[1, :4] = ids[0, :4]
    labels = ids.clone()
    labels[:, :4] = -100
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    with torch.no_grad():
        full = model(**call)
        with scoring.log_probs_only():
            lean = model(**call)
    torch.testing.assert_close(lean.log_probs, full.log_probs)
    assert full.entropy is not None and lean.entropy is None
    assert compact_calls[-1] == ("log_probs",)


def _dense_pair_mask(layout, width, window=None):
    """The row-level mask the pair attention stands for: chosen causal; rejected sees prompt[:p-1] and itself; with a
    window, only keys whose position (in their own sequence) is less than `window` behind the query's."""
    masks = []
    for lc, p, end in layout:
        m = torch.zeros(width, width, dtype=torch.bool)
        m[:end, :end] = torch.ones(end, end, dtype=torch.bool).tril()
        m[lc:end, p - 1:lc] = False
        m[end:, :] = False
        if window is not None:
            pos = torch.cat([torch.arange(lc), torch.arange(p - 1, p - 1 + end - lc), torch.zeros(width - end)])
            m &= (pos[:, None] - pos[None, :]) < window
        masks.append(m)
    return torch.stack(masks)[:, None]


def _eager(q, k, v, mask, scale, softcap, sinks):
    """Attention written out: scores, optional tanh softcap, mask, optional sink logit per head, softmax."""
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return probs[..., :v.size(-2)] @ v


@pytest.mark.parametrize("window", [None, 3, 40], ids=["no-window", "window-3", "window-longer-than-rows"])
@pytest.mark.parametrize("softcap,with_sinks", [(None, False), (2.0, False), (None, True)],
                         ids=["plain", "softcap", "sinks"])
def test_pair_attention_matches_dense_mask(window, softcap, with_sinks):
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, width = 4, 2, 8, 23
    layout = ((9, 4, 23), (7, 3, 15), (5, 5, 6))  # (chosen end, shared prefix, row end); last: empty rejected tail
    q = torch.randn(len(layout), heads, width, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(len(layout), kv_heads, width, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(heads, generator=gen, dtype=torch.float64) if with_sinks else None
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.eval()
    calls = [0]
    token = scoring._PAIR_LAYOUT.set((layout, calls))
    try:
        out, _ = scoring.pair_attention(module, q, k, v, None, scaling=0.5, sliding_window=window, softcap=softcap,
                                        s_aux=sinks)
    finally:
        scoring._PAIR_LAYOUT.reset(token)
    assert calls == [1]
    mask = _dense_pair_mask(layout, width, window)
    rep = heads // kv_heads
    mask = mask | ~mask.any(-1, keepdim=True)  # padding rows: anything finite (checked to be zeros below)
    expected = _eager(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask, 0.5, softcap, sinks)
    expected = expected.transpose(1, 2)
    for i, (_, _, end) in enumerate(layout):
        torch.testing.assert_close(out[i, :end], expected[i, :end])
        assert not out[i, end:].any()  # padding gets zeros, never NaN
    if window == 3:  # the window cut something: without it the values differ
        no_window = _eager(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                           _dense_pair_mask(layout, width) | ~mask.any(-1, keepdim=True), 0.5, softcap, sinks)
        assert not torch.allclose(no_window.transpose(1, 2)[0, :9], out[0, :9])


def test_every_fused_path_returns_length_averaged_log_probs():
    """Packed rows with the compact head, TRL's head on pre-shifted labels (context parallelism), and the plain two-row
    layout all give the same per-token log-probs divided by each sequence's scored-token count."""
    from trl.trainer.utils import add_fused_lm_head

    from minidpo.embedded import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    gen = torch.Generator().manual_seed(2)
    prompt, width = torch.randint(5, 60, (7,), generator=gen), 19
    rows, labels = [], []
    for length in (19, 15, 12, 17):  # chosen, chosen, rejected, rejected: same prompt, own answers
        ids = torch.cat([prompt, torch.randint(5, 60, (length - 7,), generator=gen)])
        rows.append(torch.nn.functional.pad(ids, (0, width - length), value=tok.pad_token_id))
        labels.append(torch.cat([torch.full((7,), -100), ids[7:], torch.full((width - length,), -100)]))
    ids, labels = torch.stack(rows), torch.stack(labels)
    mask = (labels != -100) | (torch.arange(width) < 7)
    shifted = torch.cat([labels[:, 1:], torch.full((4, 1), -100)], dim=1)

    def log_probs(share_prompt, **call):
        model = build_tiny_model(tok, seed=0)
        add_fused_lm_head(model)
        scoring.install_pair_forward(model, length_normalize=True, share_prompt=share_prompt)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask.long(), fused_lm_head=True, **call).log_probs

    two_rows = log_probs(False, labels=labels)
    counts = (labels[:, 1:] != -100).sum(dim=1)
    model = build_tiny_model(tok, seed=0)
    with torch.no_grad():  # the plain model: mean log-prob of each sequence's scored tokens
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1], dim=-1)
    token_logp = logp.gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * (labels[:, 1:] != -100)
    torch.testing.assert_close(two_rows.sum(dim=1), token_logp.sum(dim=1) / counts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_probs(True, labels=labels), two_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_probs(False, shift_labels=shifted)[:, :-1], two_rows, rtol=1e-5, atol=1e-6)
