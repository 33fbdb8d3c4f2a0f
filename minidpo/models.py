"""Loading tokenizers and causal LMs, with one-line errors instead of Hugging Face's stack traces.

One loader each, used by training, evaluation, conversion, reports and MiniMind import. Remote code runs only when
`trust_remote_code` is asked for; `local_only` loaders never reach the Hub.
"""

from __future__ import annotations

from pathlib import Path

from minidpo.errors import UserError


def first_line(e: Exception) -> str:
    """The first line of an exception's message (Hugging Face errors run to paragraphs)."""
    return (str(e).strip().splitlines() or [repr(e)])[0]


def load_tokenizer(name_or_path, revision: str | None = None, trust_remote_code: bool = False,
                   local_only: bool = True):
    """A tokenizer from a local folder or, unless `local_only`, a Hub id; UserError when it cannot be loaded."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local_only and not local.is_dir():
        raise UserError(f"tokenizer directory not found: {local}", code="missing_path")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else name, revision=revision,
                                             trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as e:
        where = "" if local.exists() else " (not a local folder, and the Hub lookup failed)"
        raise UserError(f"cannot load a tokenizer from {name!r}{where}: {first_line(e)}",
                        code="bad_tokenizer") from None


def ensure_pad_token(tokenizer) -> bool:
    """Give a tokenizer without a pad token its eos token as pad; True when it did.

    Padding is never scored and never attended to, so any id works; TRL makes the same choice. UserError when
    the tokenizer has no eos token either.
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has neither a pad nor an eos token: set pad_token in its "
                        "tokenizer_config.json", code="bad_tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    return True


def use_pad_token(tokenizer, pad_token: str | None) -> None:
    """Pad with `pad_token` (DPOConfig's option) when given, as stock TRL does, else the tokenizer's own pad or eos.

    Raises ValueError, one line, for a token the vocabulary lacks (TRL's check)."""
    if pad_token is None:
        ensure_pad_token(tokenizer)
        return
    if pad_token not in tokenizer.get_vocab():
        raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary: pick one of its tokens "
                         "(e.g. its eos token) or leave pad_token unset")
    tokenizer.pad_token = pad_token


def load_causal_lm(name_or_path, what: str = "model", revision: str | None = None, dtype=None,
                   attn_implementation: str | None = None, trust_remote_code: bool = False):
    """A causal LM from a model folder, a LoRA adapter folder (its base loaded from the adapter config) or a Hub id.

    `dtype` is a torch dtype, a name ("bfloat16") or "auto"/None (the checkpoint's). UserError when it cannot be
    loaded; `what` names it in the message ("model", "reference model").
    """
    import torch

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    name = str(name_or_path)
    kwargs = dict(revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if (Path(name).expanduser() / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(name, **kwargs)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the {what} from {name!r}: {first_line(e)}",
                        code="bad_model") from None


def check_vocab(tokenizer, model, what: str = "the model",
                advice: str = "they do not belong together (point model_name_or_path at a folder holding both)"):
    """UserError when the tokenizer has ids the model's embedding has no row for; `advice` says what to do."""
    embedding = model.get_input_embeddings()
    # num_embeddings, not weight.shape: under DeepSpeed ZeRO-3 the weight of each process is an empty placeholder
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but {what}'s embedding has {rows} rows: {advice}",
                        code="bad_model")
