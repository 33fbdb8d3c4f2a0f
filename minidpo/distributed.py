"""What minidpo adds to Accelerate's distributed engines: FSDP2 on CPU processes, the sharding check, tied weights.

Plain functions over Accelerate's state and the prepared model; `MiniDPOTrainer` calls them from its overrides.
"""

from __future__ import annotations

import os

from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from minidpo.console import say
from minidpo.errors import UserError


def restore_cpu_fsdp2(state) -> bool:
    """Put back the FSDP2 plugin `accelerate launch` configured when Accelerate fell back to CPU DDP; True if it did.

    Accelerate 1.15 honours the launcher's FSDP only on accelerator devices (AcceleratorState lists MULTI_GPU,
    MULTI_XPU, ..., not MULTI_CPU) and otherwise trains with DDP, unsharded, without a word. FSDP2's fully_shard runs
    on CPU over gloo. PartialState is set too, as Accelerate's own FSDP setup does: every later AcceleratorState() (one
    per AcceleratedOptimizer) copies PartialState's type over, and MULTI_CPU there made get_state_dict hand rank 0 the
    shards, whose tied-weight check in save_pretrained is a collective no other rank joins.
    """
    if fsdp_version_asked() != 2 or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return True


def fsdp_version_asked() -> int | None:
    """The FSDP version `accelerate launch` was configured with (distributed_type: FSDP), None without FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_sharded(model, fsdp_version: int, world: int) -> None:
    """Say how many of the prepared model's parameter tensors FSDP shards; `UserError` when it shards none, so a run
    asked to shard never trains unsharded (each process holding the whole model) without a word."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if isinstance(model, FullyShardedDataParallel):  # FSDP1 (GPUs): flat parameters, each one process's shard
        sharded = len(params)
    else:  # FSDP2 (fully_shard) holds each parameter as a DTensor sharded over the processes
        sharded = sum(isinstance(p, DTensor) for p in params)
    if sharded == 0:
        raise UserError(f"the accelerate config asks for FSDP (fsdp_version {fsdp_version}) but none of the model's "
                        f"{len(params)} parameter tensors is sharded: every process would hold and train the whole "
                        "model. On CPU minidpo shards with fsdp_version: 2 only (configs/accelerate/cpu_fsdp2.yaml)",
                        code="bad_config")
    say(f"FSDP{fsdp_version}: {sharded} of {len(params)} parameter tensors sharded over {world} "
        f"process{'es' if world > 1 else ''}")


def tied_duplicates(model) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied LM head)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied
