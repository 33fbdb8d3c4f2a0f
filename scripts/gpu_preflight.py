"""Preflight of scripts/gpu_check.sh: what this machine would run minidpo with, before any test or bench spends time.

    python3 scripts/gpu_preflight.py [--require-gpu]

One line per fact: `ok`, `info` or `FAIL`; exits 1 when any check failed, naming it. Checked: the interpreter, the
versions and locations of the packages minidpo imports (the pinned ones within the pins of pyproject.toml), pyarrow
loaded from the interpreter's own install (a carried copy breaks datasets' pickling), MiniDPOConfig constructing,
and, for Triton, which compiles a small C launcher on first use: a C compiler, Python.h, then a smoke kernel and the
GPU's name. Without --require-gpu the GPU-side checks are reported as `info` instead of failing (a CPU simulation).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACKAGES = ("torch", "triton", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed", "tokenizers",
            "huggingface_hub", "safetensors", "numpy", "pyarrow", "dill", "multiprocess", "pydantic")
REQUIRED = {"torch", "transformers", "trl", "datasets", "accelerate", "peft"}
failed: list[str] = []


def report(status: str, name: str, detail: str) -> None:
    if status == "FAIL":
        failed.append(name)
    print(f"[preflight] {status:4} {name}: {detail}", flush=True)


def packages(require_gpu: bool) -> dict:
    found = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            required = name in REQUIRED or (require_gpu and name in ("triton", "deepspeed"))
            report("FAIL" if required else "info", name, f"not importable ({type(e).__name__}: {e})".splitlines()[0])
            continue
        found[name] = module
        where = Path(module.__file__).parent.parent if getattr(module, "__file__", None) else "?"
        report("ok", name, f"{getattr(module, '__version__', '?')} from {where}")
    return found


def pins(found: dict) -> None:
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in map(Requirement, deps):
        module = found.get(req.name.replace("-", "_"))
        if module is not None and req.name in ("transformers", "trl", "accelerate", "peft", "datasets"):
            ok = req.specifier.contains(module.__version__, prereleases=True)
            report("ok" if ok else "FAIL", f"pin {req.name}", f"{module.__version__} {'within' if ok else 'outside'} "
                   f"{req.specifier} (pyproject.toml)")


def pyarrow_origin(found: dict) -> None:
    if "pyarrow" not in found:
        return
    where = Path(found["pyarrow"].__file__).resolve()
    own = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    ok = any(root in where.parents for root in own)
    report("ok" if ok else "FAIL", "pyarrow origin", f"{where.parent} is {'' if ok else 'NOT '}in the interpreter's "
           "own site-packages" + ("" if ok else " (a carried pyarrow is pickled by value by dill: do not carry it)"))


def minidpo_config() -> None:
    try:
        from minidpo.trainer import MiniDPOConfig

        with tempfile.TemporaryDirectory() as out:
            args = MiniDPOConfig(output_dir=out, report_to="none")
        report("ok", "MiniDPOConfig", f"constructs (bf16 {args.bf16}, gradient_checkpointing "
               f"{args.gradient_checkpointing})")
    except Exception as e:  # noqa: BLE001
        report("FAIL", "MiniDPOConfig", f"{type(e).__name__}: {e}".splitlines()[0])


def toolchain(require_gpu: bool) -> bool:
    """Triton builds its launcher with $CC (else cc, gcc, clang) against Python.h: both must be there."""
    gpu_status = "FAIL" if require_gpu else "info"
    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        report("ok", "C compiler", f"{shutil.which(cc)}: {version[0] if version else '?'}")
    else:
        report(gpu_status, "C compiler", "none of $CC, cc, gcc, clang on PATH (Triton cannot build its launcher)")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    report("ok" if header.is_file() else gpu_status, "Python.h", f"{header} {'present' if header.is_file() else 'MISSING'}")
    return bool(cc) and header.is_file()


def gpu(found: dict, require_gpu: bool, can_build: bool) -> None:
    torch = found.get("torch")
    gpu_status = "FAIL" if require_gpu else "info"
    if torch is None or not torch.cuda.is_available():
        report(gpu_status, "CUDA", f"torch {getattr(torch, '__version__', '(none)')} sees no CUDA device")
        report(gpu_status, "Triton smoke kernel", "not run: no CUDA device")
        return
    p = torch.cuda.get_device_properties(0)
    report("ok", "GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} "
           f"SMs, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
    if "triton" not in found or not can_build:
        report(gpu_status, "Triton smoke kernel", "not run: " + ("no triton" if "triton" not in found else
                                                                  "no C compiler or Python.h"))
        return
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            keep = offs < n
            tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=keep) + tl.load(y_ptr + offs, mask=keep), mask=keep)

        x, y = torch.randn(4099, device="cuda"), torch.randn(4099, device="cuda")
        out = torch.empty_like(x)
        start = time.perf_counter()
        add[(triton.cdiv(x.numel(), 1024),)](x, y, out, x.numel(), BLOCK=1024)
        torch.cuda.synchronize()
        ok = torch.equal(out, x + y)
        report("ok" if ok else "FAIL", "Triton smoke kernel", f"compiled and ran in {time.perf_counter() - start:.1f} s, "
               f"result {'exact' if ok else 'WRONG'}")
    except Exception as e:  # noqa: BLE001
        report("FAIL", "Triton smoke kernel", f"{type(e).__name__}: {e}".splitlines()[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--require-gpu", action="store_true", help="no CUDA, no compiler or no Triton kernel is a failure")
    args = p.parse_args(argv)
    report("ok", "python", f"{sys.version.split()[0]} at {sys.executable}")
    found = packages(args.require_gpu)
    pins(found)
    pyarrow_origin(found)
    minidpo_config()
    gpu(found, args.require_gpu, toolchain(args.require_gpu))
    if failed:
        print(f"[preflight] FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
