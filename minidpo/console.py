"""What minidpo tells people while it runs: one copy of each line, however many processes a launcher started."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, `accelerate launch` and Slurm set RANK/LOCAL_RANK), or a lone
    process; readable before any process group is formed."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def say(message: str) -> None:
    """Print a `[minidpo]` line on the main process only (the others would print the same line again)."""
    if is_main_process():
        print(f"[minidpo] {message}", flush=True)
