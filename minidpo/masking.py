"""Which tokens DPO scores.

MiniMind renders a whole conversation with the chat template, tokenizes it, truncates it to `max_length` and
scores every assistant span it finds by searching token ids for two markers: the ids of `f"{bos}assistant\\n"`
open a span, the ids of `f"{eos}\\n"` close it (closing marker included). `encode_pair` reproduces that search
token for token (`mask_mode="minimind"`), so minidpo trains on exactly what MiniMind trains on.

Other chat models cannot always express those markers (Qwen has no `bos_token`, Llama 3's `bos_token` is not
its turn opener). For them, and for `mask_mode="last-turn"`, spans come from the chat template itself: an
assistant turn is the text between the rendered prefix with the generation prompt and the rendered prefix
including that turn, mapped to tokens through the tokenizer's offsets. On MiniMind2's tokenizer both ways give
the same mask (tested); on minimind-3's the marker search also scores the empty `<think>` block its template
puts after the header, which the template way leaves out — MiniMind's behaviour is kept in "minimind" mode.

Where MiniMind's search scores nothing or something odd, `encode_pair_with_issues` says so (see `Issue` codes):
  - `no_scored_tokens` (fatal): a side scores no token, e.g. `max_length` cuts inside the prompt or the
    assistant header; MiniMind would divide 0 by its 1e-8 clamp and train on a meaningless zero log-prob.
  - `unscored_assistant_turn`: fewer assistant spans found than assistant turns (a header tokenized
    differently in context), so MiniMind silently skips that turn.
  - `unterminated_turn`: a span with no closing marker before the end of an untruncated sequence; MiniMind
    would score its padding too (we score up to the last real token).
  - `answer_truncated`: the final answer is cut by `max_length` (scored up to the cut, as MiniMind does).
  - `identical_after_truncation`: chosen and rejected differ only beyond `max_length`, so both sides are the same
    tokens: the pair trains at loss ln 2 (zero margin) and teaches nothing.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

from minidpo.errors import RecordError, UserError

MASK_MODES = ("minimind", "last-turn")
DEFAULT_MAX_LENGTH = 1024  # TRL's DPOConfig default, for tools that cut pairs as training will
TRUNCATION_MODES = ("keep_start", "keep_end")
SIDES = ("chosen", "rejected")
# What minimind-3's chat template writes before an answer without reasoning; its DPODataset removes it at random
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Per side, the sequence with every empty think block removed (empty when its render has none)
NO_THINK = "_no_think"


@dataclass(frozen=True)
class Issue:
    """Something `encode_pair_with_issues` found in one pair: `code` (see the module docstring), a message, and
    whether it is fatal (the pair cannot be trained on)."""

    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class _Scheme:
    """How one tokenizer is scored: MiniMind's marker ids, or None to take spans from the chat template."""

    turn_start_ids: tuple[int, ...] | None  # the ids of "{bos}assistant\n": where an assistant turn starts
    turn_end_ids: tuple[int, ...] | None  # the ids of "{eos}\n": where it ends


# tokenizer -> (what the scheme was derived from, scheme): recomputed when the template or markers change
_SCHEMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False, **template_kwargs) -> str:
    """The conversation as the chat template writes it; `template_kwargs` (tools, ...) go to the template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def template_kwargs(record: dict) -> dict:
    """What a record asks of the chat template, from TRL's dataset columns: `tools` (a list, or its JSON text) and
    `chat_template_kwargs` (a dict)."""
    kwargs = dict(record.get("chat_template_kwargs") or {})
    tools = record.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    if tools:
        kwargs["tools"] = tools
    return kwargs


def _scheme(tokenizer) -> _Scheme:
    source = (getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token)
    try:
        cached_source, scheme = _SCHEMES[tokenizer]
        if cached_source == source:
            return scheme
    except (KeyError, TypeError):
        pass
    if not getattr(tokenizer, "chat_template", None):
        raise RecordError(
            "no_chat_template",
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; minidpo renders "
            "conversations with it. Use a chat/instruct tokenizer, or set `tokenizer.chat_template`.",
        )
    if not getattr(tokenizer, "is_fast", False):
        raise RecordError("slow_tokenizer", "minidpo needs a fast (Rust) tokenizer for exact token offsets.")
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    scheme = _Scheme(None, None)
    if bos and eos:
        probe = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenizer)
        # MiniMind's search only means something when the template really opens a turn with
        # "<bos>assistant\n" and closes it with "<eos>\n" (true for MiniMind's ChatML templates).
        if f"{bos}assistant\n" in probe and f"{eos}\n" in probe:
            ids = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
            scheme = _Scheme(ids(f"{bos}assistant\n"), ids(f"{eos}\n"))
    try:
        _SCHEMES[tokenizer] = (source, scheme)
    except TypeError:
        pass
    return scheme


def uses_minimind_markers(tokenizer) -> bool:
    """True when "minimind" mode runs MiniMind's own marker search on this tokenizer."""
    return _scheme(tokenizer).turn_start_ids is not None


_PROBE = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
          "rejected": [{"role": "assistant", "content": "Go away"}]}


def check_mask_mode(mask_mode: str, user_facing: bool = False) -> None:
    """The one check of a mask mode against `MASK_MODES` (commands take theirs through argparse `choices=MASK_MODES`;
    MiniDPOConfig, the converters and `encode_pair` call this). Raises `RecordError` (a `ValueError`, code
    `bad_mask_mode`), or `UserError` when `user_facing` (library entry points of a command: convert, report-data)."""
    if mask_mode in MASK_MODES:
        return
    message = f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}"
    raise UserError(f"--{message.replace('_', '-', 1)}") if user_facing else RecordError("bad_mask_mode", message)


def check_tokenizer(tokenizer, max_length: int | None = None, mask_mode: str = "minimind") -> bool:
    """`uses_minimind_markers(tokenizer)`, after encoding one plain pair with it: UserError, before any record is
    read, when the tokenizer cannot score assistant tokens at all (no chat template, slow tokenizer, ...)."""
    try:
        encode_pair_with_issues(_PROBE, tokenizer, max_length=max_length, mask_mode=mask_mode)
        return uses_minimind_markers(tokenizer)
    except RecordError as e:
        raise UserError(f"this tokenizer cannot be used ({e.code}): {e.message}", code="bad_tokenizer") from None


def _find(ids: list[int], pattern: tuple[int, ...], start: int) -> int:
    """First index >= start where `pattern` occurs in `ids`, or -1 (list.index keeps the scan in C)."""
    first, n = pattern[0], len(pattern)
    i = start
    while True:
        try:
            i = ids.index(first, i)
        except ValueError:
            return -1
        if tuple(ids[i : i + n]) == pattern:
            return i
        i += 1


def minimind_spans(ids: list[int], start_ids, end_ids) -> list[tuple[int, int, bool]]:
    """MiniMind's marker search: (start, end, closed) per span; tokens start..end-1 are scored.

    A span opens right after the opening marker and runs through the closing marker inclusive; with no closing
    marker it runs to the end of the sequence (`closed` is False). The search resumes after the closing marker.
    """
    spans = []
    i = 0
    while True:
        i = _find(ids, start_ids, i)
        if i < 0:
            return spans
        start = i + len(start_ids)
        end = _find(ids, end_ids, start)
        if end < 0:
            spans.append((start, len(ids), False))
            return spans
        spans.append((start, end + len(end_ids), True))
        i = end + len(end_ids)


def assistant_char_spans(messages: list[dict], tokenizer, **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per assistant turn, the character span the model produces (answer + end of turn)."""
    text = render(messages, tokenizer, **kwargs)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(messages[:k], tokenizer, add_generation_prompt=True, **kwargs)
        upto = render(messages[: k + 1], tokenizer, **kwargs)
        if not (upto.startswith(head) and text.startswith(upto)):
            raise RecordError(
                "template_not_prefix_stable",
                "the chat template renders earlier turns differently once later turns are added (e.g. it drops "
                "reasoning from past turns), so assistant spans cannot be located exactly. Use "
                "mask_mode='last-turn' with single-turn data, or a template that renders each turn once.",
            )
        spans.append((len(head), len(upto)))
    return text, spans


def _mask_from_char_spans(offsets, char_spans) -> list[int]:
    # A token is scored when it overlaps an assistant span: a token straddling the header/answer boundary carries
    # part of the answer, and the model chose it.
    mask = [0] * len(offsets)
    for s, e in char_spans:
        for t, (a, b) in enumerate(offsets):
            if a < e and b > s and b > a:
                mask[t] = 1
    return mask


@dataclass
class _Encoded:
    ids: list[int]  # as stored: cut to max_length
    mask: list[int]
    issues: list[Issue]
    full_ids: list[int]  # before the cut


def _truncate(ids: list[int], mask: list[int], max_length, truncation_mode: str):
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    if truncation_mode == "keep_end":
        # the first kept token has no kept predecessor to be predicted from
        return ids[-max_length:], [0] + mask[-max_length + 1:] if max_length > 1 else [0]
    return ids[:max_length], mask[:max_length]


def _encode_side(messages, tokenizer, max_length, mask_mode, side, kwargs, truncation_mode,
                 text: str | None = None) -> _Encoded:
    """One side's ids and mask; `text`: its render, when the caller altered it (minimind mode, MiniMind's markers)."""
    scheme = _scheme(tokenizer)
    issues: list[Issue] = []
    n_turns = sum(m["role"] == "assistant" for m in messages)
    if mask_mode == "minimind" and scheme.turn_start_ids is not None:
        # Exactly MiniMind's call: default special-token handling, keep-start truncation.
        full = ids = tokenizer(render(messages, tokenizer, **kwargs) if text is None else text)["input_ids"]
        full_spans = minimind_spans(ids, scheme.turn_start_ids, scheme.turn_end_ids)
        if len(full_spans) != n_turns:
            issues.append(Issue(
                "unscored_assistant_turn" if len(full_spans) < n_turns else "extra_scored_span",
                f"{side}: MiniMind's marker search finds {len(full_spans)} assistant span(s) for {n_turns} "
                "assistant turn(s)"))
        if any(not closed for _, _, closed in full_spans):
            issues.append(Issue("unterminated_turn", f"{side}: an assistant span has no closing marker; MiniMind "
                                "would also score the padding after it"))
        if truncation_mode == "keep_start" and max_length is not None:
            ids = ids[:max_length]  # MiniMind searches the markers in what truncation kept
        mask = [0] * len(ids)
        for start, end, _ in minimind_spans(ids, scheme.turn_start_ids, scheme.turn_end_ids):
            mask[start:end] = [1] * (min(end, len(ids)) - start)
        answer_end = full_spans[-1][1] if full_spans else 0
    else:
        text, char_spans = assistant_char_spans(messages, tokenizer, **kwargs)
        if mask_mode == "last-turn":
            char_spans = char_spans[-1:]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        full = ids = enc["input_ids"]
        mask = _mask_from_char_spans(enc["offset_mapping"], char_spans)
        answer_end = max((t + 1 for t, m in enumerate(mask) if m), default=0)
    ids, mask = _truncate(ids, mask, max_length, truncation_mode)
    if truncation_mode == "keep_start" and max_length is not None and answer_end > max_length:
        issues.append(Issue("answer_truncated", f"{side}: max_length {max_length} cuts the final answer "
                            f"({answer_end} tokens needed)"))
    if not any(mask):
        issues.append(_nothing_scored(side, max_length, len(ids)))
    return _Encoded(ids, mask, issues, full)


def _nothing_scored(side, max_length, kept) -> Issue:
    return Issue("no_scored_tokens", f"{side}: no token is scored after truncation to max_length {max_length} "
                 f"({kept} tokens kept)" if max_length is not None else f"{side}: no assistant token found to score",
                 fatal=True)


def common_prefix(a: list, b: list) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_text_pair(record, tokenizer, max_length, truncation_mode):
    """Standard (plain-text) records, tokenized as TRL does: the completion after the prompt is scored, with the eos
    token appended when the completion does not end with it; nothing else is."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(text=record["prompt"])["input_ids"]
    full = {side: tokenizer(text=record["prompt"] + (record[side] if not eos or record[side].endswith(eos)
                                                     else record[side] + eos))["input_ids"] for side in SIDES}
    # the completion starts where the tokenized prompt and prompt + completion diverge (tokens can merge across)
    p = min(len(prompt_ids), *(common_prefix(prompt_ids, ids) for ids in full.values()))
    out, issues = {"prompt_ids": prompt_ids[:p]}, []
    for side, ids in full.items():
        ids, mask = _truncate(ids, [0] * max(p, 1) + [1] * (len(ids) - max(p, 1)), max_length, truncation_mode)
        out[f"{side}_input_ids"], out[f"{side}_loss_mask"] = ids, mask
        if not any(mask):
            issues.append(_nothing_scored(side, max_length, len(ids)))
    return out, issues


def encode_pair_with_issues(record: dict, tokenizer, max_length: int | None = None, mask_mode: str = "minimind",
                            truncation_mode: str = "keep_start", no_think: bool = False):
    """`encode_pair`'s output plus the list of `Issue`s found on the way (fatal ones mean: do not train on it)."""
    check_mask_mode(mask_mode)
    if truncation_mode not in TRUNCATION_MODES:
        raise RecordError("bad_truncation_mode", f"truncation_mode must be one of {TRUNCATION_MODES}, "
                                                 f"got {truncation_mode!r}")
    if no_think and not (mask_mode == "minimind" and uses_minimind_markers(tokenizer)):
        raise RecordError("no_think_needs_markers", "removing empty think blocks reproduces minimind-3's DPODataset, "
                          "which scores by MiniMind's markers: it needs mask_mode 'minimind' and a tokenizer with them")
    if isinstance(record["prompt"], str):
        out, issues = _encode_text_pair(record, tokenizer, max_length, truncation_mode)
        if no_think:
            out.update({f"{side}{NO_THINK}_{k}": [] for side in SIDES for k in ("input_ids", "loss_mask")})
    else:
        out, issues = _encode_messages_pair(record, tokenizer, max_length, mask_mode, truncation_mode, no_think)
    if is_scorable(out) and all(out[f"chosen_{k}"] == out[f"rejected_{k}"] for k in ("input_ids", "loss_mask")):
        # the answers differ only beyond max_length: both sides score the same tokens, the log-ratios cancel and
        # the pair trains at loss ln 2, teaching nothing
        issues = [*issues, Issue("identical_after_truncation", f"chosen and rejected are the same tokens after "
                                 f"truncation to max_length {max_length} (they differ only beyond it): the pair "
                                 "trains at loss ln 2 and teaches nothing")]
    return out, issues


def _encode_messages_pair(record: dict, tokenizer, max_length, mask_mode: str, truncation_mode: str,
                          no_think: bool = False):
    out, issues, full = {}, [], {}
    kwargs = template_kwargs(record)
    for side in SIDES:
        messages = record["prompt"] + record[side]
        # rendered here once when the empty think blocks are looked for too (no_think implies MiniMind's markers)
        text = render(messages, tokenizer, **kwargs) if no_think else None
        enc = _encode_side(messages, tokenizer, max_length, mask_mode, side, kwargs, truncation_mode, text)
        out[f"{side}_input_ids"] = enc.ids
        out[f"{side}_loss_mask"] = enc.mask
        full[side] = enc.full_ids
        issues += enc.issues
        if no_think:
            # MiniMind's post_processing_chat: a plain text replace over the whole render, every turn at once
            bare = (_encode_side(messages, tokenizer, max_length, mask_mode, side, kwargs, truncation_mode,
                                 text.replace(EMPTY_THINK, "")) if EMPTY_THINK in text else _Encoded([], [], [], []))
            out[f"{side}{NO_THINK}_input_ids"], out[f"{side}{NO_THINK}_loss_mask"] = bare.ids, bare.mask
            issues += [i for i in bare.issues if i.fatal]
    # TRL's prompt_ids: the prompt with the generation prompt, tokenized as the sequences are, cut where they diverge
    prompt = render(record["prompt"], tokenizer, add_generation_prompt=True, **kwargs)
    marker_search = mask_mode == "minimind" and _scheme(tokenizer).turn_start_ids is not None
    prompt_ids = tokenizer(prompt, **({} if marker_search else {"add_special_tokens": False}))["input_ids"]
    out["prompt_ids"] = prompt_ids[:min(len(prompt_ids), *(common_prefix(prompt_ids, ids) for ids in full.values()))]
    return out, issues


def is_scorable(encoded: dict) -> bool:
    """Both sides of an `encode_pair` result score at least one token (else the pair carries no DPO signal), and so
    do the sequences without empty think blocks it holds."""
    return all(any(encoded[f"{side}{variant}_loss_mask"]) for side in SIDES for variant in ("", NO_THINK)
               if encoded.get(f"{side}{variant}_input_ids"))


def encode_pair(record: dict, tokenizer, max_length: int | None = None, mask_mode: str = "minimind",
                truncation_mode: str = "keep_start", no_think: bool = False) -> dict:
    """Token ids and loss masks of both sides of a TRL preference record with an explicit prompt.

    Conversational records (message lists; `tools` and `chat_template_kwargs` honoured) are scored by `mask_mode`:
    every assistant turn ("minimind") or the final answer ("last-turn"). Standard records (plain text) score the
    completion, as TRL does. Returns plain lists `chosen_input_ids`, `chosen_loss_mask`, `rejected_input_ids`,
    `rejected_loss_mask`, cut to `max_length` (keeping the start, or the end with `truncation_mode="keep_end"`):
    `loss_mask[i] == 1` means token `i` is scored, i.e. predicted from position `i - 1` (never true for `i == 0`);
    and `prompt_ids`, the tokens both sequences start with (TRL's prompt, for the record). With `no_think`, also
    `chosen_no_think_input_ids`, `chosen_no_think_loss_mask` and the rejected ones: the side rendered with every
    empty `<think>\n\n</think>\n\n` block removed, as minimind-3's DPODataset removes them (empty lists when the
    render has none); `minimind` mode with MiniMind's markers only.
    """
    return encode_pair_with_issues(record, tokenizer, max_length, mask_mode, truncation_mode, no_think)[0]
