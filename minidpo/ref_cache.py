"""Reference log-probs kept on disk across runs, keyed by what they depend on.

TRL's own cache lives beside the dataset's cache files, keyed by its fingerprint: in-memory datasets (what train.py
passes) get a random fingerprint in a per-process temporary folder, so every run recomputes and ranks other than 0
cannot find rank 0's file. This cache is keyed by content: the reference weights (TRL's hash of them), the encoded
ids and masks (so tokenizer, data, `max_length` and `mask_mode`), `length_normalize` and the autocast dtype. Rank 0
reads and writes; every rank gets the same values.

Location: `ref_cache_dir`, else `$MINIDPO_CACHE`, else `~/.cache/minidpo`; one `ref-logps/<key>.pt` file per set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from datasets.fingerprint import Hasher

from minidpo.files import atomic_path, cache_root
from minidpo.pairs import REF_COLUMNS, content_hash
from minidpo.scoring import SCORING_VERSION

_VERSION = "minidpo.ref-logps/2"  # bump when the values for the same key would change (2: the model's config)


def cache_file(model_hash, model, dataset, args) -> Path:
    """Where the reference log-probs of `dataset` (encoded pairs) under training config `args` are kept.

    `model_hash` is TRL's hash of the reference weights; the model's class and config join it, since equal weights
    score differently under another architecture (a Mistral's sliding window, a Llama's full attention), and so does
    the scoring code's version, since a change to how log-probs are computed must not reuse old values."""
    key = Hasher.hash((model_hash, architecture(model), content_hash(dataset), args.max_length, args.mask_mode,
                       args.length_normalize, args.bf16, args.fp16, _VERSION, SCORING_VERSION))
    root = Path(args.ref_cache_dir) if args.ref_cache_dir else cache_root()
    return root / "ref-logps" / f"{key}.pt"


def architecture(model) -> tuple:
    """The model's class and config values, without its name or path (a copy elsewhere scores the same)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("name_or_path", "transformers_version")}
    return type(model).__name__, json.dumps(config, sort_keys=True, default=str)


def read(path: Path, accelerator) -> torch.Tensor | None:
    """The cached `[pairs, 2]` tensor, or None; one decision for all ranks (they run forwards together)."""
    found = [torch.load(path, weights_only=True) if accelerator.is_main_process and path.exists() else None]
    broadcast_object_list(found, from_process=0)
    return found[0]


def write(path: Path, logps: torch.Tensor, accelerator) -> None:
    """Store on the main process, atomically (a run killed mid-write leaves no half file under the key)."""
    if accelerator.is_main_process:
        with atomic_path(path) as tmp:
            torch.save(logps, tmp)


def attach(dataset, logps: torch.Tensor):
    """`dataset` with `ref_chosen_logps` / `ref_rejected_logps` columns from a `[pairs, 2]` tensor (replaced if any)."""
    present = [c for c in REF_COLUMNS if c in dataset.column_names]
    if present:
        dataset = dataset.remove_columns(present)
    return dataset.add_column(REF_COLUMNS[0], logps[:, 0].tolist()).add_column(REF_COLUMNS[1], logps[:, 1].tolist())
