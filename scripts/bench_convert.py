"""Time `minidpo convert` with a tokenizer on MiniMind-like data.

    python scripts/bench_convert.py [--n 20000] [--tokenizer ../shared/tokenizers/minimind2] [--max-length 1024]

Records look like MiniMind's dpo.jsonl: a ~100-token prompt (a quarter of them multi-turn) and two ~300-token
answers, mixed English and Chinese, so a pair is ~700 tokens with the MiniMind2 tokenizer.
The issue's target: 20,000 records in under 60 s on a 2-core machine.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minidpo.convert import convert_file  # noqa: E402
from minidpo.masking import MASK_MODES  # noqa: E402
from minidpo.models import load_tokenizer  # noqa: E402

WORDS = ("the model answer data train loss token policy reference reward preference chosen rejected "
         "learning rate batch gradient step retreat team market growth plan customer service quality "
         "because therefore however first second finally example result value python code function").split()
HANZI = "我们的模型训练数据偏好回答问题这个方法可以需要使用进行学习优化结果分析系统用户助手内容"


def text(rng: random.Random, n_words: int) -> str:
    parts = []
    for i in range(n_words):
        chinese = rng.random() < 0.3
        parts.append("".join(rng.choices(HANZI, k=rng.randint(2, 4))) if chinese else rng.choice(WORDS))
        if i % 17 == 16:
            parts.append(".\n" if rng.random() < 0.3 else ",")
    return " ".join(parts)


def make_record(rng: random.Random) -> dict:
    # Word counts are tuned so MiniMind2 gives ~100 prompt tokens and ~300 tokens an answer.
    if rng.random() < 0.25:
        prompt = [{"role": "user", "content": text(rng, 11)}, {"role": "assistant", "content": text(rng, 14)},
                  {"role": "user", "content": text(rng, 11)}]
    else:
        prompt = [{"role": "user", "content": text(rng, 37)}]
    return {"chosen": prompt + [{"role": "assistant", "content": text(rng, rng.randint(100, 150))}],
            "rejected": prompt + [{"role": "assistant", "content": text(rng, rng.randint(100, 150))}]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "minimind2"))
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--mask-mode", choices=MASK_MODES, default="minimind")
    ap.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    args = ap.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "dpo.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for _ in range(args.n):
                f.write(json.dumps(make_record(rng), ensure_ascii=False) + "\n")
        run = lambda: convert_file(src, Path(d) / "out", tokenizer=tokenizer, max_length=args.max_length,  # noqa: E731
                                   mask_mode=args.mask_mode, eval_fraction=0.01, progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            stats = prof.runcall(run)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        else:
            stats = run()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    tl = stats["token_lengths"]
    print(f"records: {stats['records_read']:,} (converted {stats['converted']:,}, rejected {stats['rejected']:,})")
    print(f"tokens a pair: mean {tl['chosen']['mean'] + tl['rejected']['mean'] - tl['prompt']['mean']:.0f} "
          f"(prompt {tl['prompt']['mean']:.0f}, chosen {tl['chosen']['mean']:.0f}, "
          f"rejected {tl['rejected']['mean']:.0f} incl. prompt)")
    # CPU seconds too: on a shared machine wall time also counts other people's jobs.
    print(f"convert_file: {seconds:.1f} s total ({cpu:.1f} s CPU), {stats['records_read'] / seconds:,.0f} records/s")


if __name__ == "__main__":
    main()
