"""Data loading at scale, before and after prepared data: peak memory of each process, time to the first step.

    python scripts/bench_data.py [--size-gb 1] [--baseline 6d0b8c6] [--json out.json]

Generates a MiniMind dpo.jsonl of `--size-gb` (the records of scripts/bench_convert.py: ~100-token prompts, two
~300-token answers, mixed English and Chinese; the MiniMind2 tokenizer the repository
ships) and a tiny Llama, then launches `minidpo/train.py` through `accelerate launch` with
configs/accelerate/cpu_ddp.yaml, one run per row, each on a fresh datasets cache:

  before x2   the code at `--baseline` (a git worktree of that commit): every process parses the whole file into
              Python lists, `Dataset.from_list` copies them into memory and every process encodes all pairs
  after  x2   this checkout: the first process of the node writes the validated pairs to Arrow files and encodes
              them into Arrow cache files; the other process waits, then memory-maps both
  after  x1   the same in one process: the reference for the time to the first step

Columns, per process (rank):
  first step s   wall time from launching `accelerate launch` to the end of the first optimizer step
  peak RSS MB    the process's peak resident memory (getrusage ru_maxrss), file pages it mapped included
  data RSS MB    peak RSS minus the resident memory just before train.py loads the data (imports, tokenizer)
  anon MB        peak of the memory not backed by a file (RssAnon, sampled every second): what the process owns,
                 as opposed to pages of memory-mapped files, which the kernel shares between processes and can drop

Each process stops itself at the end of the first optimizer step. Runs are sequential; a run that is killed
(out of memory) is reported with the last peak its processes wrote. Targets of issue 15: after x2, rank 1's data
RSS under 10% of rank 0's; after x2's time to the first step at most 1.2x after x1's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# shipped with the repository (Apache-2.0, NOTICE beside it)
MINIMIND2_TOKENIZER = REPO / "scripts" / "assets" / "tokenizers" / "minimind2"


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory now, MB: all of it (VmRSS) or the part not backed by files (RssAnon)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -------------------------------------------------------------------------------------------------------------
# Worker: one process of a launched run (the code under test is whichever `minidpo` --code-root holds)


def worker(code_root: str, result: str, train_args: list[str]) -> None:
    sys.path.insert(0, code_root)
    t0 = float(os.environ["BENCH_T0"])
    rank = int(os.environ.get("RANK", 0))
    out = Path(f"{result}.rank{rank}.json")
    state = {"rank": rank, "phase": "start"}

    def write():
        state["peak_rss_mb"] = peak_rss_mb()
        state["peak_anon_mb"] = max(state.get("peak_anon_mb", 0.0), rss_mb("RssAnon"))
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, out)

    def keep_writing():  # a run killed for memory still leaves its last peak
        while True:
            write()
            time.sleep(1)

    from transformers import TrainerCallback

    import minidpo.trainer
    from minidpo import train

    assert Path(train.__file__).resolve().is_relative_to(Path(code_root).resolve()), train.__file__
    state["t_imported"] = time.time() - t0
    threading.Thread(target=keep_writing, daemon=True).start()
    load_pairs = train.load_pairs

    def timed_load_pairs(*args, **kwargs):
        state.update(phase="data", rss_before_data_mb=rss_mb(), t_data_start=time.time() - t0)
        loaded = load_pairs(*args, **kwargs)
        state.update(phase="model", t_data_loaded=time.time() - t0, rss_data_loaded_mb=rss_mb())
        return loaded

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, trainer_state, control, **kwargs):
            state.update(phase="first step", t_first_step=time.time() - t0, rss_first_step_mb=rss_mb())
            write()
            sys.stdout.flush()
            os._exit(0)  # every rank reaches this after the same collective step; nothing else is measured

    base = minidpo.trainer.MiniDPOTrainer

    class Timed(base):
        def __init__(self, *args, callbacks=None, **kwargs):
            state.update(t_trainer_start=time.time() - t0, rss_trainer_start_mb=rss_mb())
            super().__init__(*args, callbacks=[*(callbacks or []), FirstStep()], **kwargs)
            state.update(t_trainer_built=time.time() - t0, rss_trainer_built_mb=rss_mb())

    train.load_pairs = timed_load_pairs
    minidpo.trainer.MiniDPOTrainer = Timed
    status = train.run(train_args)
    state["phase"] = f"exited {status} before the first step"
    write()
    sys.exit(status or 1)


# -------------------------------------------------------------------------------------------------------------
# Driver


def make_data(path: Path, size_gb: float) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_convert import make_record

    target, written, n = size_gb * 1e9, 0, 0
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = json.dumps(make_record(rng), ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def make_model(folder: Path, tokenizer_path: str | None) -> None:
    sys.path.insert(0, str(REPO))
    from minidpo import embedded
    from minidpo.models import load_tokenizer

    tok = load_tokenizer(tokenizer_path) if tokenizer_path else embedded.build_tokenizer()
    embedded.build_tiny_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)


def run_row(name: str, code_root: Path, processes: int, work: Path, args) -> dict:
    out_dir = work / f"out-{name}"
    cache = work / f"cache-{name}"
    for d in (out_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    result = work / f"result-{name}"
    for old in work.glob(f"result-{name}.rank*.json"):
        old.unlink()
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, MINIDPO_CACHE=str(cache), HF_DATASETS_CACHE=str(cache / "datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(code_root), BENCH_T0=repr(time.time()))
    env.pop("ACCELERATE_CONFIG_FILE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(processes),
           str(Path(__file__).resolve()), "--worker", "--code-root", str(code_root), "--result", str(result),
           "--", "--model_name_or_path", str(work / "model"), "--dataset_name", str(work / "dpo.jsonl"),
           "--output_dir", str(out_dir), "--per_device_train_batch_size", "2", "--max_steps", "1",
           "--max_length", str(args.max_length), "--report_to", "none", "--save_strategy", "no",
           "--disable_tqdm", "true", "--ddp_timeout", "7200"]
    started = time.time()
    with open(work / f"log-{name}.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"result-{name}.rank*.json"))]
    row = {"row": name, "processes": processes, "returncode": proc.returncode, "wall_s": time.time() - started,
           "ranks": ranks}
    for r in ranks:
        r["data_rss_mb"] = r["peak_rss_mb"] - r.get("rss_before_data_mb", 0.0)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| row | rank | first step s | peak RSS MB | data RSS MB | anon MB | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for r in row["ranks"]:
            first = r.get("t_first_step")
            status = "ok" if row["returncode"] == 0 else f"exit {row['returncode']}, stopped in {r['phase']}"
            lines.append(f"| {row['row']} | {r['rank']} | {'-' if first is None else f'{first:.0f}'} | "
                         f"{r['peak_rss_mb']:.0f} | {r['data_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | {status} |")
    return "\n".join(lines)


def verdict(rows: dict) -> list[str]:
    after2, after1 = rows.get("after x2"), rows.get("after x1")
    notes = []
    if after2 and after2["returncode"] == 0 and len(after2["ranks"]) == 2:
        r0, r1 = sorted(after2["ranks"], key=lambda r: r["rank"])
        share = r1["data_rss_mb"] / max(r0["data_rss_mb"], 1e-9)
        notes.append(f"after x2: rank 1's data RSS is {share:.1%} of rank 0's (target < 10%)")
        if after1 and after1["returncode"] == 0:
            ratio = max(r0["t_first_step"], r1["t_first_step"]) / after1["ranks"][0]["t_first_step"]
            notes.append(f"after x2: time to the first step is {ratio:.2f}x after x1's (target <= 1.2x)")
    return notes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--baseline", default="6d0b8c6", help="commit of the code before prepared data")
    ap.add_argument("--rows", default="before x2,after x2,after x1")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--work", default=None, help="folder for data, model and runs (default: a temporary one); "
                                                  "data and model there are reused")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code-root", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        return worker(args.code_root, args.result, [a for a in rest if a != "--"])

    work = Path(args.work or tempfile.mkdtemp(prefix="minidpo-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "dpo.jsonl"
    if not data.is_file() or abs(data.stat().st_size - args.size_gb * 1e9) > 1e7:
        t = time.time()
        n = make_data(data, args.size_gb)
        print(f"generated {data}: {n:,} records, {data.stat().st_size / 1e9:.2f} GB in {time.time() - t:.0f} s")
    tokenizer = str(MINIMIND2_TOKENIZER)
    if not (work / "model" / "config.json").is_file():
        make_model(work / "model", tokenizer)
    print(f"data {data} ({data.stat().st_size / 1e9:.2f} GB), tokenizer {tokenizer}, "
          f"{os.cpu_count()} cores")

    baseline = work / f"baseline-{args.baseline}"
    rows = {}
    try:
        for name in [r.strip() for r in args.rows.split(",")]:
            which, procs = name.split(" x")
            if which == "before" and not baseline.is_dir():
                subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO,
                               check=True, capture_output=True)
            root = baseline if which == "before" else REPO
            rows[name] = run_row(name.replace(" ", ""), root, int(procs), work, args)
            rows[name]["row"] = name
            print(table([rows[name]]).splitlines()[-int(procs):], flush=True)
    finally:
        if baseline.is_dir():
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, capture_output=True)
    print(table(list(rows.values())))
    for note in verdict(rows):
        print(note)
    if args.json:
        Path(args.json).write_text(json.dumps({"size_gb": args.size_gb, "rows": list(rows.values())}, indent=1))


if __name__ == "__main__":
    main()
