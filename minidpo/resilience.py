"""Surviving faults: resuming from checkpoints and stopping cleanly when the scheduler says so."""

from __future__ import annotations


def resolve_resume(args):
    """The checkpoint to resume from: `resume_from_checkpoint` as given (a path), or None."""
    return args.resume_from_checkpoint


def callbacks(args) -> list:
    """Trainer callbacks this module contributes to every run."""
    return []
