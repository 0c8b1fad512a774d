#!/usr/bin/env bash
# Fill .whl/ with the wheels the lent GPU machine lacks, for scripts/gpu_check.sh.
#
# Usage:
#   make gpu-wheels                 # or: bash scripts/gpu_wheels.sh [DIR]
#
# The GPU machine (Python 3.12, x86_64, no network) has torch 2.11, transformers
# 5.17, tokenizers 0.23, huggingface_hub 1.x, accelerate, safetensors, numpy,
# pandas, pyarrow, opencv, matplotlib, rich and pytest, but no xtuner, mmengine or
# DeepSpeed. xtuner 0.2.0 does not import with transformers 5 (it imports
# is_safetensors_available, which is gone), and transformers 4.48 refuses
# tokenizers 0.23 and huggingface_hub 1.x, so those travel too, pinned as in
# requirements.txt. They are installed there with
#   pip install --no-index --no-deps --target DIR .whl/*.whl
# and put first on PYTHONPATH, so they shadow the machine's newer copies.
#
# DeepSpeed 0.16.2 is published as an sdist only: its wheel is built here with
# DS_BUILD_OPS=0 (pure Python; ZeRO-1/2/3 need no compiled op).
#
# Checks: exactly one version of each package, and at most MAX_MIB (40) MiB in
# all (the device tool carries 64 MiB, the repository included). Exit 2 on a
# failed check, 1 when pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
MAX_MIB=${MAX_MIB:-40}
PYTHON=${PYTHON:-python3}

# name==version, one per line: the packages the machine lacks or has in a version
# xtuner 0.2.0 cannot use. Pure-Python wheels except tokenizers (abi3) and
# pydantic_core (cp312).
WHEELS=(
  xtuner==0.2.0
  mmengine==0.10.6
  transformers==4.48.0
  tokenizers==0.21.4
  huggingface_hub==0.36.2
  peft==0.21.2
  datasets==5.0.1
  dill==0.4.1
  multiprocess==0.70.19
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated_types==0.8.0
  typing_inspection==0.4.5
  addict==2.4.0
  yapf==0.43.0
  platformdirs==4.14.9
  termcolor==3.3.0
  hjson==3.1.0
  loguru==0.7.3
  # Liger Kernel (Triton; pure Python): the GPU recipes' use_liger_kernel = True
  liger_kernel==0.8.5
)
DEEPSPEED=deepspeed==0.16.2

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# Every manylinux tag the machine's pip accepts (pip matches each exactly).
plat=()
for t in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$t"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$DIR" "${WHEELS[@]}"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$build" "$DEEPSPEED" \
  || DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w "$build" "$DEEPSPEED"
cp "$build"/deepspeed-*.whl "$DIR"/

"$PYTHON" - "$DIR" "$MAX_MIB" "${WHEELS[@]}" "$DEEPSPEED" <<'EOF'
import os, re, sys
from collections import defaultdict

folder, max_mib, wanted = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()
versions = defaultdict(set)
total = 0
for name in os.listdir(folder):
    if name.endswith(".whl"):
        dist, version = name.split("-")[:2]
        versions[norm(dist)].add(version)
        total += os.path.getsize(os.path.join(folder, name))
errors = [f"{d}: {len(v)} versions ({', '.join(sorted(v))}); keep one" for d, v in versions.items() if len(v) > 1]
for spec in wanted:
    dist, version = spec.split("==")
    if versions.get(norm(dist)) != {version}:
        errors.append(f"{spec}: missing from {folder}")
if total > max_mib * 2**20:
    errors.append(f"{total / 2**20:.1f} MiB of wheels, over the {max_mib:g} MiB limit")
for e in errors:
    print(f"error: gpu-wheels: {e}", file=sys.stderr)
if errors:
    sys.exit(2)
print(f"{folder}: {len(versions)} wheels, {total / 2**20:.1f} MiB")
EOF
