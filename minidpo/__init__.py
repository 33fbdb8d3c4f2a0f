"""minidpo: MiniMind's DPO (assistant-only masking, length-averaged log-ratios) on TRL / Transformers."""

__version__ = "0.1.0"

# The trainer pulls in torch and TRL; import it lazily so data tools stay fast to start.
_LAZY = {"MiniDPOConfig": "minidpo.trainer", "MiniDPOTrainer": "minidpo.trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minidpo' has no attribute {name!r}")


__all__ = ["MiniDPOConfig", "MiniDPOTrainer", "__version__"]
