"""Training data prepared once per node: validated pairs in Arrow files that every process memory-maps.

Parsing and validating a large dpo.jsonl into Python lists in each process would cost each process the time and
a full copy of the data. Instead the first process of each node (`main_process_first(local=True)` in train.py)
streams the input into `train.arrow` / `eval.arrow`, plus its rejects and counts, in a cache folder named by
everything the result depends on, the input's bytes included (under `$MINIDPO_CACHE/prepared`, by default
~/.cache/minidpo/prepared); the other processes, and later runs on the same data, open those files. Pages of a
memory-mapped file are shared between processes and count once in the node's memory. The trainer's encoding
(`MiniDPOTrainer._prepare_dataset`) then caches its token ids in the same folder, also once per node.
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from minidpo import files, loading
from minidpo.errors import UserError
from minidpo.records import special_tokens

# Part of every cache key: change it whenever what is written changes (validation, schema, split rule), so
# folders written before are not read.
_VERSION = "minidpo.prepared/2"
_BATCH = 1000  # records per Arrow record batch: bounded memory while writing, few batches when reading


def _message_list():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def features():
    """The Arrow schema of a prepared pair: TRL's conversational prompt/chosen/rejected (validated messages carry
    exactly `role` and `content`)."""
    from datasets import Features

    return Features({"prompt": _message_list(), "chosen": _message_list(), "rejected": _message_list()})


@dataclass
class PreparedData:
    """The prepared splits (`eval` None when there is none), where they live, and what was rejected on the way."""

    train: object  # datasets.Dataset, memory-mapped
    eval: object
    folder: Path
    fmt: str
    reasons: dict  # rejected lines by reason
    examples: dict  # reason -> "line N: message" of its first reject

    @property
    def n_rejected(self) -> int:
        return sum(self.reasons.values())

    @property
    def rejects_file(self) -> Path:
        return self.folder / "rejects.jsonl"

    def why_empty(self) -> str:
        """Why no pair is usable, for the one-line error: the dominant reject reason with its first example."""
        if not self.reasons:
            return "the file holds no records"
        reason, n = max(self.reasons.items(), key=lambda kv: kv[1])
        example = self.examples.get(reason, "?")
        example = example if len(example) <= 160 else example[:157] + "..."  # one readable line
        return (f"all {self.n_rejected} lines rejected, {n} as {reason} (first: {example})" if n < self.n_rejected
                else f"all {n} lines rejected as {reason} (first: {example})")


def cache_key(path, fmt: str, tokenizer, splits: tuple, eval_fraction: float, seed: int) -> str:
    """A name for what `prepare` writes: the content of each split's file (`files.file_digest`; never a path or a
    modification time, so the same bytes anywhere share a folder), their format, the strings rejected inside
    contents (they depend on the tokenizer), the splits read and the eval split."""
    sources = (loading.split_path(path, split, fmt) for split in splits)
    digests = [files.file_digest(f) if f is not None else None for f in sources]
    blob = json.dumps([_VERSION, digests, fmt, special_tokens(tokenizer), list(splits), eval_fraction, seed])
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=12).hexdigest()


def prepare(path, tokenizer, *, splits: tuple = ("train", "eval"), eval_fraction: float = 0.0, seed: int = 0,
            cache_root=None, fmt: str | None = None) -> PreparedData:
    """The prepared data of `path` (any input `minidpo.loading` reads), built now unless the cache has it.

    `splits` names the (train, eval) splits of a convert directory to read (`loading.split_path`).
    Without an eval split of its own (a single file, or a convert directory written without --eval-fraction), a
    share `eval_fraction` of the pairs is held out with `convert --eval-fraction`'s rule. Call it in the first
    process of a node before the others (they find the folder it wrote). Concurrent builders (nodes sharing a
    cache folder) each write a temporary folder; the first renamed into place is kept.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}", code="bad_config")
    fmt = fmt or loading.detect_format(path)
    root = Path(cache_root).expanduser() if cache_root else files.cache_root() / "prepared"
    folder = root / cache_key(path, fmt, tokenizer, splits, eval_fraction, seed)
    if not (folder / "counts.json").is_file():
        files.remove_orphans(root)  # temporary folders of builds killed on this host
        try:
            _build(path, fmt, tokenizer, splits, eval_fraction, seed, folder)
        except OSError as e:
            raise files.write_error("the prepared pairs", root, e, "set dataset_cache_dir (or MINIDPO_CACHE) to a "
                                    "writable folder with room for about 6x the data") from None
    return _open(folder)


def _build(path, fmt: str, tokenizer, splits: tuple, eval_fraction: float, seed: int, folder: Path) -> None:
    from datasets.arrow_writer import ArrowWriter

    tmp = files.temp_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train_file, eval_file = (loading.split_path(path, split, fmt) for split in splits)
        split_train = eval_file is None and eval_fraction > 0
        reasons: dict[str, int] = {}
        examples: dict[str, str] = {}  # the first message of each reason, for the one line when nothing is usable
        writers = {split: ArrowWriter(features=features(), path=str(tmp / f"{split}.arrow"),
                                      writer_batch_size=_BATCH) for split in ("train", "eval")}
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects, writers["train"], writers["eval"]:
            for source, split in ((train_file, "train"), (eval_file, "eval")):
                if source is None:
                    continue
                for record, reject in loading.iter_records(source, tokenizer):
                    if reject is not None:
                        if fmt == "convert-dir":
                            reject["file"] = source.name  # which of the directory's files the line number is in
                        rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
                        reasons[reject["reason"]] = reasons.get(reject["reason"], 0) + 1
                        where = f"{source.name} line" if fmt == "convert-dir" else "line"
                        examples.setdefault(reject["reason"], f"{where} {reject['line']}: {reject['message']}")
                    elif split == "eval" or (split_train and loading.is_eval(record, eval_fraction, seed)):
                        writers["eval"].write(record)
                    else:
                        writers["train"].write(record)
            rows = {split: writer.finalize()[0] for split, writer in writers.items()}
        # "source": the path it was first built from (the same bytes at another path share the folder)
        counts = {"format": fmt, "source": str(Path(path).resolve()), **rows, "rejected": sum(reasons.values()),
                  "reasons": reasons, "examples": examples}
        # written last: a folder with counts.json is complete
        (tmp / "counts.json").write_text(json.dumps(counts, indent=1) + "\n", encoding="utf-8")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "counts.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(folder: Path) -> PreparedData:
    from datasets import Dataset

    counts = json.loads((folder / "counts.json").read_text(encoding="utf-8"))
    train = Dataset.from_file(str(folder / "train.arrow"))
    evals = Dataset.from_file(str(folder / "eval.arrow")) if counts["eval"] else None
    return PreparedData(train=train, eval=evals, folder=folder, fmt=counts["format"], reasons=counts["reasons"],
                        examples=counts["examples"])
