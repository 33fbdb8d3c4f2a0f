"""scripts/bench.py runs end to end and fails a row whose final loss is off the parity row's.

Each bench row is a subprocess (its import time is most of a tiny row's cost), so these run the fewest rows that
check what they claim: every row once, bf16 included, in the smoke run; two rows for the failing objective.
"""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from helpers import REPO, SUBPROCESS_TIMEOUT, assert_one_line_error, subprocess_env

WITHIN_TOLERANCE = "final loss against minimind-loop: every row within tolerance"


def _bench(*args: str, rc: int = 0) -> str:
    """stdout of a tiny two-step bench run, which must exit with `rc`."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--shape", "tiny", "--steps", "2",
                           "--max-length", "128", "--device", "cpu", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_smoke_every_row_keeps_the_loss_in_bf16_too(tmp_path):
    """All four rows; the tuned ones forced to bf16 autocast (their dtype on CPUs with native bf16), checked at the
    bf16 tolerance against the fp32 loop, on any CPU."""
    out = tmp_path / "rows.json"
    stdout = _bench("--dtype", "bf16", "--json", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["parity"] == {"row": "minimind-loop", "off": []} and report["vendor"] is None  # no GPU: none
    assert set(report["matmul_peak_gflops"]) == {"float32", "bfloat16"}
    assert [r["name"] for r in rows] == ["minidpo", "trl-default", "trl-tuned", "minimind-loop"]
    for r in rows:
        assert set(r) == {"name", "real_tokens_per_s", "peak_mem_mb", "mfu", "final_loss"}
        # no bound that timing decides (a busy machine slows rows and the peak probe alike): MFU is bounded where
        # it is computed, test_mfu_is_bounded_by_the_row_rate checks the formula
        assert r["real_tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and 0 < r["mfu"] <= 1
    for name, dtype in (("minidpo", "bf16"), ("trl-default", "fp32"), ("trl-tuned", "bf16"), ("minimind-loop", "fp32")):
        assert re.search(rf"^\| {name} \({dtype}\) \| \d+ \|", stdout, re.M), stdout
    assert WITHIN_TOLERANCE in stdout, stdout


@pytest.mark.slow
def test_bench_fails_a_row_trained_on_another_objective():
    """Summed instead of length-averaged log-ratios: a different objective, whatever its speed. In fp32, whose
    tolerance (1e-5) the 2-step difference (~8e-5) exceeds on every CPU; bf16's tolerance would not see it."""
    stdout = _bench("--dtype", "fp32", "--rows", "minidpo,minimind-loop", "--set", "length_normalize=false", rc=1)
    assert re.search(r"^final loss against minimind-loop: OUT OF TOLERANCE .*: minidpo$", stdout, re.M), stdout


def test_mfu_is_bounded_by_the_row_rate():
    """8 * params * tokens / seconds over the peak; a peak probe that read below the row's own rate (the machine
    was busy while probing) is replaced by that rate, so MFU never passes 100%."""
    mfu = _load_bench().model_flops_utilization
    assert mfu(1_000_000, 1000, 2.0, 1e10) == (0.4, False)  # 4e9 FLOP/s of 1e10
    assert mfu(1_000_000, 1000, 2.0, 4e9) == (1.0, False)
    assert mfu(1_000_000, 1000, 2.0, 2.6e9) == (1.0, True)  # measured as 1.53 before the bound


def test_loss_parity_names_the_rows_off_their_dtype_tolerance():
    bench = _load_bench()
    fp32, bf16 = bench.LOSS_TOLERANCE["fp32"], bench.LOSS_TOLERANCE["bf16"]
    assert fp32 < bf16
    row = lambda name, dtype, loss: {"name": name, "dtype": dtype, "final_loss": loss}  # noqa: E731
    rows = [row("minidpo", "bf16", 0.5 + (fp32 + bf16) / 2), row("trl-default", "fp32", 0.5 + 2 * fp32),
            row("trl-tuned", "fp32", 0.5 - fp32 / 2), row("minimind-loop", "fp32", 0.5)]
    parity, off = bench.loss_parity(rows)
    assert parity["name"] == "minimind-loop" and off == ["trl-default"]
    parity, off = bench.loss_parity(rows[:3])  # no loop: stock TRL's fp32 row is the reference
    assert parity["name"] == "trl-default" and off == ["trl-tuned"]
    assert bench.loss_parity(rows[:1]) == (None, [])


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_matmul_peak_probe_is_bounded_in_work(dtype, monkeypatch):
    """On a device where one matmul takes a whole second (bf16 without native support once took 20 minutes before
    the first row), the probe stays at its smallest size and runs one matmul per measurement, and the peak is the
    formula's. A clock that reports one second per measurement stands in for the slow device, so no assertion
    depends on how busy this machine is."""
    from types import SimpleNamespace

    bench = _load_bench()
    ticks = iter(range(10**6))
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    import torch

    calls, real_randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a) or real_randn(*a, **k))
    peak, size = bench.matmul_peak("cpu", dtype, n=2048, budget_s=0.5)
    assert size == 256 and peak == 2 * 256**3 / 1e9  # one 256 x 256 matmul a second, in GFLOP/s
    assert {a[:2] for a in calls} == {(256, 256)} and len(calls) == 2 * 4  # 4 measurements of 2 operands each


def test_matmul_peak_probe_warms_up_before_timing(monkeypatch):
    """A first product that pays a start-up (cuBLAS's handle and kernel choice on a GPU) is not timed: timed, it would
    stop the probe at 256 x 256, whose throughput would pass for the peak. Products and clock are simulated (1 ms per
    512^3, 0.2 s more for the first), so how busy this machine is changes nothing."""
    from types import SimpleNamespace

    import torch

    bench = _load_bench()
    clock, calls = [0.0], []

    def mm(a, b):
        clock[0] += (0.2 if not calls else 0) + 1e-3 * (a.shape[0] / 512) ** 3
        calls.append(a.shape[0])
        return a

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch, "mm", mm)
    _, size = bench.matmul_peak("cpu", "float32", n=512, budget_s=0.5)
    assert size == 512, calls


def test_vendor_peak_is_known_for_the_lent_gpu(monkeypatch):
    import torch

    bench = _load_bench()
    assert bench.vendor_peak("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert bench.vendor_peak("cuda") == ("NVIDIA H200", {"float32": 67e3, "bfloat16": 989e3})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert bench.vendor_peak("cuda")[1]["bfloat16"] == 756e3
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert bench.vendor_peak("cuda") is None


def _gpu_check(tmp_path, *args, **env):
    env = dict(subprocess_env(), CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT)


def test_gpu_check_parses_and_dry_runs_without_cuda(tmp_path):
    """The GPU scripts are valid bash; without a CUDA device (and without --require-gpu) the check lists what it would
    run, with each step's timeout, writes nothing and exits 0."""
    for script in ("gpu_check.sh", "gpu_wheels.sh", "gpu_simulate.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0, script
    proc = _gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout and "sees no CUDA device" in proc.stdout
    for command in ("--no-index --no-deps --target", "gpu_preflight.py --require-gpu", "tests/test_gpu.py",
                    "--shape minimind2-small", "--shape minimind2 ", "gpu_check.md", "(timeout 200s)"):
        assert command in proc.stdout, command
    # the steps' own timeouts fit the 8 minutes (the script also caps each by what is left of them)
    assert sum(map(int, re.findall(r"\(timeout (\d+)s\)", proc.stdout))) <= 470
    assert not (tmp_path / "out").exists()


def _python_without_torch(tmp_path):
    """An interpreter wrapper under which `import torch` fails, as on a machine without it."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('no torch in this interpreter')\n")
    wrapper = tmp_path / "python3"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("python,reason", [
    (None, "sees no CUDA device"),
    ("/nonexistent/python3", "no /nonexistent/python3 on PATH"),
    ("without-torch", "torch is not importable by"),
])
def test_gpu_check_require_gpu_fails_with_its_reason(tmp_path, python, reason):
    """What the device call passes: without an interpreter, torch or CUDA the check fails with the reason in one
    line and exit 2, never passes as a dry run (it once printed "no CUDA device" and exited 0 for a missing
    `python`), and writes nothing."""
    env = {} if python is None else {"PYTHON": _python_without_torch(tmp_path) if python == "without-torch" else python}
    proc = _gpu_check(tmp_path, "--require-gpu", **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc.stderr, "gpu_check: error: --require-gpu:", reason)
    assert not (tmp_path / "out").exists()


def test_readme_gives_the_device_call(tmp_path):
    """docs/performance.md "On a GPU": the device call fits the device tool (a command of at most 2,000 characters, a timeout of
    at most 600 s that covers the check's 8 minutes), carries the wheels, and passes --require-gpu."""
    readme = (REPO / "docs" / "performance.md").read_text()
    call = json.loads(re.search(r"```json\n(\{.*?\})\n```", readme[readme.index("## On a GPU"):], re.S).group(1))
    assert set(call) == {"command", "carry", "timeout_s"}
    assert len(call["command"]) <= 2000 and 480 < call["timeout_s"] <= 600 and call["carry"] == [".whl"]
    assert "bash scripts/gpu_check.sh --require-gpu" in call["command"] and '"$OUT"' in call["command"]


@pytest.mark.slow
def test_bench_data_measures_both_code_versions(tmp_path):
    """scripts/bench_data.py on a tiny file: the baseline commit (a worktree) and this checkout each reach their first
    optimizer step on 2 processes, every rank reports its times and memory, and the worktree is removed."""
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench_data.py", "--size-gb", "0.001", "--work", str(tmp_path),
                           "--rows", "before x2,after x2", "--baseline", baseline, "--json", str(out)],
                          cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["row"], r["returncode"], sorted(x["rank"] for x in r["ranks"])) for r in rows] == \
        [("before x2", 0, [0, 1]), ("after x2", 0, [0, 1])]
    for rank in (x for r in rows for x in r["ranks"]):
        assert rank["phase"] == "first step"
        assert 0 < rank["t_data_start"] < rank["t_first_step"] and rank["peak_rss_mb"] >= rank["rss_before_data_mb"]
    assert "rank 1's data RSS is" in proc.stdout
    worktree = tmp_path / f"baseline-{baseline}"
    listed = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert not worktree.exists() and str(worktree) not in listed
