#!/usr/bin/env bash
# The checks only a CUDA machine can make, in one command, within 8 minutes:
#   (a) the tests marked `gpu` (bf16 autocast, TRL's Triton fused LM head with packed pair rows, FSDP2 and DeepSpeed
#       ZeRO-2/3 on one GPU with the reference precomputed; DeepSpeed ones skip when it is not installed),
#   (b) scripts/bench.py on the MiniMind2-Small (512x8) and MiniMind2 (768x16) shapes, four rows each,
#   (c) one markdown file, $OUT/gpu_check.md: the test summary and both bench tables (real tokens/s, peak GPU memory,
#       MFU against the bf16 matmul peak measured on this GPU).
#   bash scripts/gpu_check.sh            # OUT defaults to gpu-check-output/
# On a machine without CUDA it says what it would run and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-output}"
PY="${PYTHON:-python}"

steps=(
  "timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py"
  "timeout 100 $PY scripts/bench.py --shape minimind2-small --steps 8 --device cuda --json $OUT/bench-minimind2-small.json"
  "timeout 120 $PY scripts/bench.py --shape minimind2 --steps 8 --device cuda --json $OUT/bench-minimind2.json"
)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here, nothing run. On a CUDA machine this runs, writing $OUT/gpu_check.md:"
  for step in "${steps[@]}"; do echo "  $step"; done
  exit 0
fi

mkdir -p "$OUT"
report="$OUT/gpu_check.md"
{
  echo "# minidpo GPU check"
  echo
  echo "$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')")"
  echo
} > "$report"
status=0
for i in "${!steps[@]}"; do
  log="$OUT/step-$i.log"
  echo "gpu_check: ${steps[$i]}"
  if ! bash -c "${steps[$i]}" > "$log" 2>&1; then status=1; fi
  tail -n 3 "$log"
  {
    echo "## \`${steps[$i]}\`"
    echo
    if [ "$i" -eq 0 ]; then
      echo '```'; tail -n 1 "$log"; echo '```'
    else
      # the bench's own table: real tok/s, peak MB (torch.cuda.max_memory_allocated), MFU, loss parity
      grep -E '^(\| |\[bench\] minimind|\[bench\] [a-z])' "$log" || tail -n 5 "$log"
    fi
    echo
  } >> "$report"
done
echo "gpu_check: wrote $report"
exit "$status"
