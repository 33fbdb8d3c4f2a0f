#!/usr/bin/env bash
# The checks only a CUDA machine can make, in one command of at most 8 minutes, on the lent GPU machine as it is: its
# python3, the wheels scripts/gpu_wheels.sh put in .whl/ unpacked offline into a private folder put on PYTHONPATH
# (nothing installed into that python, minidpo imported from this checkout), no network.
#   bash scripts/gpu_check.sh --require-gpu --out "$OUT"   # the device call (docs/performance.md, "On a GPU")
#   bash scripts/gpu_check.sh                              # elsewhere, without CUDA: lists what it would run, exits 0
#   bash scripts/gpu_check.sh --cpu --out DIR              # the CPU-runnable parts (what scripts/gpu_simulate.sh runs)
# Options: --out DIR (default $OUT, else gpu-check-output/), --wheels DIR (default .whl), --require-gpu: no python3,
# no torch or no CUDA device is a failure (exit 2, with the reason), never a dry run.
# Steps, each with its exit status, seconds and any timeout in DIR/gpu_check.md, with its verdict:
#   wheels     the carried wheels unpacked (pip --no-index --no-deps --target, offline)
#   preflight  scripts/gpu_preflight.py: versions and pins, pyarrow's origin, compiler and Python.h, a Triton smoke
#              kernel, the GPU's name
#   tests      the tests marked gpu (bf16 training, TRL's Triton head with packed pairs, FSDP2 and ZeRO-2/3 on one GPU)
#              and tests/test_contracts.py (the private members and pins minidpo relies on)
#   bench-*    scripts/bench.py on the MiniMind2-Small (512x8) and MiniMind2 (768x16) shapes, MiniMind2's tokenizer:
#              tok/s, peak memory, MFU, the matmul peak measured beside the vendor's, the loss-parity verdict
# DIR gets at most 7 files: gpu_check.md, preflight.log, tests.log, and a .log and a .json per bench shape.
set -uo pipefail  # no -e: a failing step is recorded in the report, and the next one still runs
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-gpu-check-output}"
WHEELS=.whl
REQUIRE_GPU=0
CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --require-gpu) REQUIRE_GPU=1 ;;
    --cpu) CPU=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    *) echo "gpu_check: error: unknown option $1 (--require-gpu, --cpu, --out DIR, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done
BUDGET_S=470  # the 8 minutes, less what the script itself spends between steps

fail() { echo "gpu_check: error: $1" >&2; exit 2; }
since() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

# Which run this is: GPU (CUDA seen), CPU (--cpu, no CUDA), or a dry run. The reason CUDA is not there is kept.
why=""
if ! command -v "$PY" > /dev/null; then
  why="no $PY on PATH"
else
  # stdout only: a warning torch prints on stderr must not pass for the reason
  if ! why="$("$PY" -c 'import torch; ok = torch.cuda.is_available(); print("" if ok else f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")' 2> /dev/null)"; then
    why="torch is not importable by $PY: $("$PY" -c 'import torch' 2>&1 | tail -n 1)"
  fi
fi
if [ -z "$why" ]; then MODE=gpu
elif [ "$REQUIRE_GPU" = 1 ]; then fail "--require-gpu: $why"
elif [ "$CPU" = 1 ]; then MODE=cpu
else MODE=dry
fi

# name | timeout s | command; bench JSONs are written next to their logs.
if [ "$MODE" = cpu ]; then
  steps=(
    "preflight|180|$PY scripts/gpu_preflight.py"
    "tests|900|MINIDPO_GPU_TESTS_ON_CPU=1 $PY -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_contracts.py"
    "bench-tiny|600|$PY scripts/bench.py --shape tiny --steps 2 --max-length 128 --device cpu --json @OUT@/bench-tiny.json"
  )
else
  steps=(
    "preflight|40|$PY scripts/gpu_preflight.py --require-gpu"
    "tests|200|$PY -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_contracts.py"
    "bench-minimind2-small|95|$PY scripts/bench.py --shape minimind2-small --steps 8 --device cuda --json @OUT@/bench-minimind2-small.json"
    "bench-minimind2|115|$PY scripts/bench.py --shape minimind2 --steps 8 --device cuda --json @OUT@/bench-minimind2.json"
  )
fi

if [ "$MODE" = dry ]; then
  echo "gpu_check: no CUDA device here ($why), nothing run. On a CUDA machine this runs, writing $OUT_DIR/gpu_check.md:"
  echo "  wheels: $PY -m pip install --no-index --no-deps --target <private folder> $WHEELS/*.whl"
  for s in "${steps[@]}"; do IFS='|' read -r name t cmd <<< "$s"; echo "  $name (timeout ${t}s): ${cmd//@OUT@/$OUT_DIR}"; done
  exit 0
fi

mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
start_all=$(date +%s)
rows=()
status=0

record() {  # name rc seconds timeout verdict
  local timed_out=no
  if [ "$2" = 124 ] || [ "$2" = 137 ]; then timed_out="yes (${4}s)"; fi
  [ "$2" = 0 ] || status=1
  rows+=("| $1 | $2 | $3 | $timed_out | $5 |")
  echo "gpu_check: $1: exit $2 in $3 s, timed out: $timed_out; $5"
}

# The carried wheels, unpacked outside the interpreter's install; the checkout first so minidpo needs no install.
site=""
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")"
  t0=$(date +%s%N)
  timeout -k 5 60 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$site" "$WHEELS"/*.whl > "$OUT_DIR/preflight.log" 2>&1
  rc=$?
  record wheels $rc "$(since "$t0")" 60 \
    "$(ls "$WHEELS"/*.whl | wc -l) wheels into $site$([ $rc = 0 ] || echo ': FAILED, see preflight.log')"
fi
export PYTHONPATH="${site:+$site:}$REPO${PYTHONPATH:+:$PYTHONPATH}"

for s in "${steps[@]}"; do
  IFS='|' read -r name t cmd <<< "$s"
  cmd="${cmd//@OUT@/$OUT_DIR}"
  if [ "$MODE" = gpu ]; then  # what is left of the 8 minutes caps the step
    left=$((BUDGET_S - ($(date +%s) - start_all)))
    if [ "$left" -lt 10 ]; then record "$name" 124 0 "$t" "not run: the 8-minute budget is spent"; continue; fi
    [ "$left" -lt "$t" ] && t=$left
  fi
  log="$OUT_DIR/$name.log"
  echo "gpu_check: $name: $cmd" | tee -a "$log"
  t0=$(date +%s%N)
  timeout -k 5 "$t" bash -c "$cmd" >> "$log" 2>&1
  rc=$?
  secs="$(since "$t0")"
  case "$name" in
    preflight) verdict="$(grep -c '^\[preflight\] ok ' "$log") ok, $(grep -c '^\[preflight\] FAIL' "$log") failed$(grep -m1 '^\[preflight\] FAILED' "$log" | sed 's/^\[preflight\] FAILED/:/')" ;;
    tests) verdict="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
           bf16="$(grep '^bf16 - fp32' "$log" | paste -sd';' - | sed 's/;/; /g')"; [ -n "$bf16" ] && verdict="$verdict; $bf16" ;;
    *) verdict="$(grep -m1 -E '^(final loss against|row .* failed)' "$log" || echo 'no loss-parity verdict (see the log)')" ;;
  esac
  record "$name" "$rc" "$secs" "$t" "${verdict:-no summary line (see the log)}"
done

report="$OUT_DIR/gpu_check.md"
{
  echo "# minidpo GPU check ($MODE)"
  echo
  grep -E '^\[preflight\] (ok|FAIL|info) +(python|GPU|CUDA|torch|transformers|trl|Triton smoke kernel):' \
    "$OUT_DIR/preflight.log" | sed 's/^\[preflight\] */- /'
  echo
  echo "| step | exit | seconds | timed out | verdict |"
  echo "| --- | ---: | ---: | --- | --- |"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Total $(( $(date +%s) - start_all )) s; exit $status. Logs beside this file."
  for log in "$OUT_DIR"/bench-*.log; do
    [ -e "$log" ] || continue
    echo
    echo "## $(basename "$log" .log)"
    echo
    # the bench's own lines: shape and peaks (measured, vendor), the table, the parity verdict
    grep -E '^(\| |\[bench\] (minimind2|tiny|vendor)|final loss against)' "$log" || tail -n 5 "$log"
  done
} > "$report"
echo "gpu_check: wrote $report"
cat "$report"
exit "$status"
