"""What minidpo tells people while it runs: one copy of each line, however many processes a launcher started."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Whether this is rank 0 (or a lone process): minidpo's one way to ask.

    Once Accelerate has set up the processes (a Trainer exists), its answer, which is the Trainer's
    (`is_world_process_zero`, `accelerator.is_main_process`) and also knows the ranks of launchers that set no RANK
    (mpirun); before that, the launcher's RANK/LOCAL_RANK (torchrun, `accelerate launch`), so it can be asked before
    any process group is formed. Never imports Accelerate itself: commands that do not train stay light."""
    state = sys.modules.get("accelerate.state")
    if state is not None and state.is_initialized():
        return state.PartialState().is_main_process
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def say(message: str) -> None:
    """Print a `[minidpo]` line on the main process only (the others would print the same line again)."""
    if is_main_process():
        print(f"[minidpo] {message}", flush=True)
