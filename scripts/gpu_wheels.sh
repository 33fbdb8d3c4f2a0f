#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for Python 3.12 on manylinux x86_64, into the git-ignored .whl/ that the
# device call carries (scripts/gpu_check.sh unpacks them there, offline). Run here, where PyPI is reachable:
#   bash scripts/gpu_wheels.sh            # then: device run, carry [".whl"] (docs/performance.md, "On a GPU")
# Checks that every wheel's requirements are met by the device (scripts/gpu_device.txt) or by another carried wheel,
# that pyarrow is not among them, and that wheels plus the travelling tree stay well under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl

# The versions CI tests with. transformers: the device's 5.17 lacks what MiniDPOConfig reads (pinned to 5.24);
# peft: the device's is not the one tested with 5.24; trl, datasets and their dill / multiprocess, and DeepSpeed's
# pydantic stack and hjson: not on the device at all. pyarrow is NOT carried: the device has it, and a copy loaded
# from outside the interpreter's install is pickled by value by dill, which breaks datasets' Dataset.from_list.
BINARY=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0)
SDIST=(deepspeed==0.19.8)  # published as an sdist only; DS_BUILD_OPS=0 builds a pure-Python wheel (ops JIT-built there)
WHEEL_BUDGET_MIB=32        # of the 64 MiB a device call carries, tree included
TOTAL_BUDGET_MIB=48        # wheels + the tree that travels: a quarter of the limit left for the tree to grow

rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-binary :all: -w "$DEST" "${SDIST[@]}"

"$PY" - "$DEST" scripts/gpu_device.txt "$WHEEL_BUDGET_MIB" "$TOTAL_BUDGET_MIB" <<'EOF'
import subprocess, sys, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

dest, device_list, wheel_budget, total_budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wheels = sorted(dest.glob("*.whl"))
carried = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels}
device = {canonicalize_name(line.split("==")[0]) for line in device_list.read_text().splitlines()
          if line.strip() and not line.startswith("#")}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
errors = []
if "pyarrow" in carried:
    errors.append("pyarrow must not be carried (the device has it; dill would pickle a carried copy by value)")
for name, wheel in carried.items():
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    for spec in meta.get_all("Requires-Dist") or []:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate(env):
            continue  # an extra's requirement, or another platform's
        dep = canonicalize_name(req.name)
        if dep not in carried and dep not in device:
            errors.append(f"{wheel.name} needs {req}, which neither the device nor .whl has")
wheel_mib = sum(w.stat().st_size for w in wheels) / 2**20
# What a device call sends besides the carried folder: tracked files and untracked ones git does not ignore.
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                       check=True).stdout.split(b"\0")
tree_mib = sum(p.stat().st_size for p in map(Path, map(bytes.decode, filter(None, files))) if p.is_file()) / 2**20
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
print(f"gpu_wheels: {len(wheels)} wheels, {wheel_mib:.1f} MiB; with the tree ({tree_mib:.1f} MiB): "
      f"{wheel_mib + tree_mib:.1f} MiB of the 64 MiB a call carries")
if wheel_mib > wheel_budget or wheel_mib + tree_mib > total_budget:
    errors.append(f"over budget: wheels {wheel_mib:.1f} MiB (at most {wheel_budget}), "
                  f"with the tree {wheel_mib + tree_mib:.1f} MiB (at most {total_budget})")
for e in errors:
    print(f"gpu_wheels: error: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
echo 'carry: [".whl"]'
