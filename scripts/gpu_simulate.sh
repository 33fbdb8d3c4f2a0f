#!/usr/bin/env bash
# The GPU check's CPU-runnable parts, in an environment built like the lent GPU machine, on a CPU machine:
#   bash scripts/gpu_simulate.sh [--venv DIR] [--out DIR]      # defaults: /tmp/gpusim, /tmp/gpusim-out
# 1. A venv of Python 3.12 (the device's is 3.12.3; $SIM_PYTHON, else python3.12 on PATH or in pyenv, else this
#    python3, which is said) holding what the device holds and minidpo uses, at the device's versions
#    (scripts/gpu_device.txt): torch 2.11 from PyPI with its CUDA libraries (they load without a GPU), transformers
#    5.17, accelerate 1.15, pyarrow, ... Whatever the resolver adds that the device lacks and the wheels carry
#    (pydantic, for one) is removed again, so the carried copies are the ones used. Kept between runs.
# 2. scripts/gpu_wheels.sh: the carried wheels into .whl/.
# 3. With the venv's python3 first on PATH, no PYTHONPATH and the network cut (`unshare -n`, where this user may):
#    the documented device call (docs/performance.md) itself, which without CUDA must stop at once with exit 2 and
#    its reason; then
#    scripts/gpu_check.sh --cpu: the wheels unpacked offline, the preflight, the gpu tests that run on a CPU plus
#    the contracts, and a tiny bench. What it cannot show: CUDA, Triton, FSDP2/ZeRO on a GPU, speeds.
# Never run by the tests (it downloads about 4 GB the first time); it never touches the python it is started from.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=/tmp/gpusim
OUT_DIR=/tmp/gpusim-out
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift ;;
    --out) OUT_DIR="$2"; shift ;;
    *) echo "gpu_simulate: error: unknown option $1 (--venv DIR, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

# The first candidate that runs (a pyenv shim for a version not selected is on PATH but fails).
PY312=""
for c in ${SIM_PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then PY312="$(command -v "$c")"; break; fi
done
if [ -z "$PY312" ]; then
  PY312="$(command -v python3)"
  echo "gpu_simulate: no Python 3.12 here: simulating with $("$PY312" --version) (the device has 3.12.3; the wheels stay cp312)"
fi

# The device's packages minidpo's imports reach (its tests and benches included), pinned where KINDS.md says.
NEEDED="torch triton transformers accelerate huggingface-hub tokenizers safetensors numpy peft pyarrow pandas pytest
hypothesis pyyaml jinja2 matplotlib xxhash requests httpx tqdm psutil msgpack ninja py-cpuinfo nvidia-ml-py einops
fsspec filelock packaging regex"
reqs="$(for n in $NEEDED; do grep -E "^$n(==|$)" scripts/gpu_device.txt || { echo "gpu_simulate: error: $n is not in scripts/gpu_device.txt" >&2; exit 2; }; done | tr '\n' ' ')"
if [ "$(cat "$VENV/.gpusim" 2>/dev/null)" != "$PY312 $reqs" ]; then
  echo "gpu_simulate: building $VENV ($("$PY312" --version)): $reqs"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --progress-bar off $reqs
  echo "$PY312 $reqs" > "$VENV/.gpusim"
fi

bash scripts/gpu_wheels.sh

# The device lacks what the wheels carry, except what it has in another version (transformers, peft).
carried="$(ls .whl | sed -E 's/-[^-]+-[^-]+-[^-]+-[^-]+\.whl$//; s/_/-/g' | tr 'A-Z' 'a-z')"
absent="$(for n in $carried; do grep -qiE "^$n(==|$)" scripts/gpu_device.txt || echo "$n"; done | tr '\n' ' ')"
"$VENV/bin/python" -m pip uninstall --quiet -y $absent 2>&1 | grep -v "not installed" || true
echo "gpu_simulate: $VENV has none of: $absent"
"$VENV/bin/python" -c 'import torch, transformers, accelerate, sys; print(f"gpu_simulate: device-like python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")'

# The device machine's view: its python3 first on PATH, no PYTHONPATH, the network cut where this user may.
device=(env -u PYTHONPATH PATH="$VENV/bin:$PATH")
if unshare -n true 2> /dev/null; then
  echo "gpu_simulate: network cut (unshare -n): only the loopback interface"
  device=(unshare -n bash -c 'ip link set lo up 2> /dev/null; exec "$@"' _ "${device[@]}")
else
  echo "gpu_simulate: unshare -n is not allowed here: the network stays up (HF_HUB_OFFLINE and --no-index still apply)"
fi
set +e

# the documented device call (docs/performance.md) itself, as the device tool would run it: without CUDA it must stop at once, exit 2, reason given.
call="$("$VENV/bin/python" -c 'import json, re, sys; s = open("docs/performance.md").read(); s = s[s.index("## On a GPU"):]
print(json.loads(re.search(r"```json\n(\{.*?\})\n```", s, re.S).group(1))["command"])')"
echo "gpu_simulate: the documented device call (docs/performance.md): $call"
rm -rf "$OUT_DIR.call"
"${device[@]}" OUT="$OUT_DIR.call" bash -c "$call"
rc=$?
if [ $rc != 2 ] || [ -e "$OUT_DIR.call" ]; then echo "gpu_simulate: error: the device call exited $rc without CUDA (expected 2, nothing written)" >&2; exit 1; fi
echo "gpu_simulate: without CUDA the device call exits 2 with its reason, as it must"

rm -rf "$OUT_DIR"
"${device[@]}" bash scripts/gpu_check.sh --cpu --out "$OUT_DIR"
rc=$?
echo "gpu_simulate: gpu_check.sh --cpu exited $rc; $(ls "$OUT_DIR" | wc -l) files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $rc
