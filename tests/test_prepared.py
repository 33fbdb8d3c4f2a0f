"""minidpo.prepared: the pairs written once to Arrow files, memory-mapped by every reader, identical to what
`minidpo.loading` reads; every line converted or rejected; a folder reused only for the same input."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, read_jsonl, subprocess_env
from records_data import bad_input_lines, write_input
from minidpo import prepared
from minidpo.convert import convert_file
from minidpo.loading import is_eval, load_trl_records


@pytest.fixture
def source(tmp_path):
    """A MiniMind dpo.jsonl with one line of every bad kind (BOM, CRLF, blank lines) and 7 good pairs."""
    path = tmp_path / "dpo.jsonl"
    write_input(path, bad_input_lines())
    return path


def test_prepared_pairs_are_the_loaded_pairs_memory_mapped(source, tmp_path):
    records, rejects = load_trl_records(source)
    data = prepared.prepare(source, None, cache_root=tmp_path / "cache")

    assert list(data.train) == records and data.eval is None
    assert [f["filename"] for f in data.train.cache_files] == [str(data.folder / "train.arrow")]
    assert data.train._data.__class__.__name__ == "MemoryMappedTable"
    # every non-blank line is a pair or a reject, with its line number and reason
    n_lines = sum(reason != "blank" for _, reason in bad_input_lines())
    assert len(data.train) + data.n_rejected == n_lines
    assert read_jsonl(data.rejects_file) == rejects
    assert data.reasons == {r: sum(x["reason"] == r for x in rejects) for r in {x["reason"] for x in rejects}}
    assert data.fmt == "minimind"


def test_eval_fraction_holds_out_what_convert_holds_out(source, tmp_path):
    records, _ = load_trl_records(source)
    for seed in (0, 1):
        data = prepared.prepare(source, None, eval_fraction=0.5, seed=seed, cache_root=tmp_path / "cache")
        train = [r for r in records if not is_eval(r, 0.5, seed)]
        evals = [r for r in records if is_eval(r, 0.5, seed)]
        assert list(data.train) == train and list(data.eval) == evals and train and evals


def test_a_convert_directory_keeps_its_splits_and_names_the_file_of_a_reject(source, tmp_path):
    convert_file(source, tmp_path / "conv", eval_fraction=0.5, seed=1, progress=False)
    with open(tmp_path / "conv" / "eval.jsonl", "ab") as f:
        f.write(b'{"chosen": [\n')
    data = prepared.prepare(tmp_path / "conv", None, cache_root=tmp_path / "cache")
    assert list(data.train) == read_jsonl(tmp_path / "conv" / "train.jsonl")
    evals, _ = load_trl_records(tmp_path / "conv", "eval")
    assert list(data.eval) == evals
    [reject] = read_jsonl(data.rejects_file)
    assert (reject["file"], reject["reason"], reject["line"]) == ("eval.jsonl", "invalid_json", len(evals) + 1)


def test_a_folder_is_reused_for_the_same_input_only(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = prepared.prepare(source, None, cache_root=cache)
    built = []
    monkeypatch.setattr(prepared, "_build", lambda *a: built.append(a) or pytest.fail("rebuilt"))
    again = prepared.prepare(source, None, cache_root=cache)
    assert again.folder == first.folder and list(again.train) == list(first.train) and not built
    monkeypatch.undo()

    # a tokenizer that forbids no other strings in contents: the same folder
    from minidpo.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    assert prepared.prepare(source, tokenizer, cache_root=cache).folder == first.folder
    # a changed file, another split rule or a tokenizer with one more special token: another folder
    other = {prepared.prepare(source, None, eval_fraction=0.5, cache_root=cache).folder}
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>"]})
    other.add(prepared.prepare(source, tokenizer, cache_root=cache).folder)
    with open(source, "ab") as f:
        f.write(b"\n")
    other.add(prepared.prepare(source, None, cache_root=cache).folder)
    assert first.folder not in other and len(other) == 3
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_an_interrupted_build_leaves_nothing_a_reader_would_take(source, tmp_path, monkeypatch):
    """A build that fails half-way leaves no folder with counts.json; the next call builds it whole."""
    cache = tmp_path / "cache"
    real = prepared.loading.iter_records

    def failing(path, tokenizer=None):
        for i, item in enumerate(real(path, tokenizer)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(prepared.loading, "iter_records", failing)
    with pytest.raises(KeyboardInterrupt):
        prepared.prepare(source, None, cache_root=cache)
    assert not cache.exists() or list(cache.iterdir()) == []
    monkeypatch.undo()
    assert list(prepared.prepare(source, None, cache_root=cache).train) == load_trl_records(source)[0]


def test_a_second_builder_of_the_same_folder_keeps_the_first(source, tmp_path):
    """Nodes sharing a cache folder may build at once: the first complete folder renamed into place wins, the other
    builder's copy is dropped and it reads the winner."""
    cache = tmp_path / "cache"
    first = prepared.prepare(source, None, cache_root=cache)
    marker = first.folder / "train.arrow"
    stamp = marker.stat().st_mtime_ns
    prepared._build(source, "minimind", None, ("train", "eval"), 0.0, 0, first.folder)  # a late, concurrent builder
    assert marker.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == [first.folder.name]


WORKER = """
import json, os, sys
from pathlib import Path
from accelerate import PartialState
from minidpo import train
built, loaded = [], []
real_build, real_load = train.prepared._build, train.load_pairs
train.prepared._build = lambda *a: built.append(PartialState().process_index) or real_build(*a)
train.load_pairs = lambda *a: loaded.append(real_load(*a)) or loaded[-1]
train.main(*train.parse(sys.argv[1:]))
data, rank = loaded[0][0], PartialState().process_index
Path(os.environ["RESULTS"], f"rank{rank}.json").write_text(json.dumps(
    {"rank": rank, "built": built, "n": len(data), "mapped": data._data.__class__.__name__}))
"""


@pytest.mark.slow
def test_two_processes_prepare_and_encode_once(tiny_assets, tmp_path):
    """Under `accelerate launch` with 2 processes, the first process of the node builds the folder and encodes the
    pairs; the other opens both: one build, the same memory-mapped pairs on both ranks, one set of encoded files."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = subprocess_env(tmp_path, threads=1)
    env.update(MINIDPO_CACHE=str(tmp_path / "cache"), RESULTS=str(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), str(script),
           "--model_name_or_path", str(tiny_assets / "base"), "--dataset_name", str(tiny_assets / "dpo.jsonl"),
           "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_steps", "1",
           "--per_device_train_batch_size", "2", "--save_strategy", "no"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in results] == [0, 1], proc.stdout[-3000:]
    assert [r["built"] for r in results] == [[0], []]
    assert results[0]["n"] == results[1]["n"] == 160
    assert {r["mapped"] for r in results} == {"MemoryMappedTable"}
    [folder] = (tmp_path / "cache" / "prepared").iterdir()
    # the trainer's encoding map and its filter each wrote one cache file: rank 1 found rank 0's (a rank that
    # fingerprinted the work differently would have written its own)
    assert len(list(folder.glob("cache-*.arrow"))) == 2


# ---------------------------------------------------------------------------------------------------------
# Keyed by content; nothing left behind


def test_a_file_rewritten_with_the_same_size_and_mtime_is_prepared_again(tmp_path):
    """A restore, `touch -r` or a sync tool can give new pairs the old file's size and modification time: the key
    is the content, so the new pairs are trained on, not the old folder's."""
    import os

    from records_data import line, pair

    src, cache = tmp_path / "dpo.jsonl", tmp_path / "cache"
    src.write_bytes(line(pair("q", "good A", "bad A")) + b"\n")
    stamp = src.stat()
    old = prepared.prepare(src, None, cache_root=cache)
    src.write_bytes(line(pair("q", "good B", "bad B")) + b"\n")  # same size
    os.utime(src, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # what `touch -r` does
    assert src.stat().st_size == stamp.st_size and src.stat().st_mtime_ns == stamp.st_mtime_ns
    new = prepared.prepare(src, None, cache_root=cache)
    assert new.folder != old.folder
    assert [r["chosen"][0]["content"] for r in new.train] == ["good B"]
    # the same bytes elsewhere are the same pairs: the folder is found again
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(src.read_bytes())
    assert prepared.prepare(copy, None, cache_root=cache).folder == new.folder


KILLED_BUILD = """
import os, signal, sys
from minidpo import prepared
real = prepared.loading.iter_records
def dying(path, tokenizer=None):
    for i, item in enumerate(real(path, tokenizer)):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # no finally runs: what a kill -9 or the OOM killer does
        yield item
prepared.loading.iter_records = dying
prepared.prepare(sys.argv[1], None, cache_root=sys.argv[2])
"""


def test_a_killed_build_leaves_no_orphan_once_the_next_one_runs(source, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(source), str(cache)], env=subprocess_env(),
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    [orphan] = list(cache.iterdir())
    assert orphan.name.startswith(".") and ".tmp-" in orphan.name and not (orphan / "counts.json").exists()
    data = prepared.prepare(source, None, cache_root=cache)
    assert sorted(p.name for p in cache.iterdir()) == [data.folder.name]
    assert list(data.train) == load_trl_records(source)[0]


def test_an_unwritable_or_full_cache_is_one_line_and_leaves_nothing(source, tmp_path, monkeypatch):
    from datasets.arrow_writer import ArrowWriter

    from minidpo.errors import UserError

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"cannot write the prepared pairs to .*a-file/cache: Not a directory; "
                                        "set dataset_cache_dir \\(or MINIDPO_CACHE\\)") as e:
        prepared.prepare(source, None, cache_root=tmp_path / "a-file" / "cache")
    assert "\n" not in e.value.message

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ArrowWriter, "write", full)
    with pytest.raises(UserError, match="cannot write the prepared pairs to .*: no space left on the device"):
        prepared.prepare(source, None, cache_root=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary folder, no folder a reader would take


def test_an_out_of_range_eval_fraction_is_refused(source, tmp_path):
    from minidpo.errors import UserError

    for bad in (1.0, 1.5, -0.5):
        with pytest.raises(UserError, match=r"eval_fraction must be in \[0, 1\)"):
            prepared.prepare(source, None, eval_fraction=bad, cache_root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_why_nothing_is_usable_names_the_dominant_reason_and_its_first_line(tmp_path):
    src = tmp_path / "trl.jsonl"
    string_prompt = json.dumps({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]})
    src.write_text(f'{{"chosen": [\n{string_prompt}\n{string_prompt}\n', encoding="utf-8")
    data = prepared.prepare(src, None, cache_root=tmp_path / "cache")
    assert len(data.train) == 0
    assert data.why_empty() == ("all 3 lines rejected, 2 as bad_type (first: line 2: 'prompt' must be a list of "
                                "messages (conversational format), got string)")
