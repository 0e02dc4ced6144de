#!/usr/bin/env bash
# scripts/gpu_check.py on an offline CUDA machine: a bundle made here, and the run there.
#
#   scripts/gpu_bundle.sh make BUNDLE [SAMPLE] [DOGS51]   # here, with network (or a package index) and the data
#   scripts/gpu_bundle.sh run BUNDLE OUTDIR [ARGS…]        # there, from this checkout; ARGS go to gpu_check.py
#
# The machine is assumed to have a CUDA image's Python 3.12 with PyTorch, torchvision, ONNX Runtime, OpenCV,
# onnx, onnxscript, matplotlib, Typer, Rich, scikit-learn, SciPy and pytest (pytest-xdist spreads the suite).
# BUNDLE/wheels holds what such images lack, at the versions this checkout was tested with here: albumentations
# and its needs, Starlette, uvicorn, python-multipart. BUNDLE/data holds the Stanford Dogs sample and dogs51 as
# tar.gz (about 53 MB together). `run` installs the wheels into a temporary folder (nothing on the machine
# changes), unpacks the data to /tmp, runs the check under a hard limit and leaves OUTDIR/gpu-check.tar.gz (every
# log and figure, without the prepared data and runs) and OUTDIR/summary.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
verb=${1:-}
bundle=${2:-}
[ -n "$verb" ] && [ -n "$bundle" ] || { sed -n '2,14p' "$0" >&2; exit 2; }

# name==version as pip here has them (the [train,serve] install this checkout's tests passed with), built for the
# target's Python (GPU_PYTHON_VERSION, default 3.12) on x86_64 Linux.
WHEELS="albumentations albucore pydantic pydantic_core annotated-types typing-inspection typing_extensions
  stringzilla simsimd starlette uvicorn python-multipart"

case "$verb" in
make)
  sample=${3:-$here/../shared/data/stanford-dogs-sample}
  dogs51=${4:-$here/../shared/data/dogs51}
  python=${PYTHON:-$here/.venv/bin/python}
  mkdir -p "$bundle/wheels" "$bundle/data"
  for name in $WHEELS; do
    pinned=$("$python" -m pip freeze 2>/dev/null | grep -i "^${name//[-_]/[-_]}==" || true)
    [ -n "$pinned" ] || { echo "error: $name is not installed in $python; pip install -e '.[train,serve]' first" >&2; exit 2; }
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$bundle/wheels" "$pinned"
  done
  for set in "$sample" "$dogs51"; do
    [ -d "$set/Images" ] || { echo "error: $set has no Images/ folder" >&2; exit 2; }
    tar czf "$bundle/data/$(basename "$set").tar.gz" -C "$(dirname "$set")" "$(basename "$set")"
  done
  du -sh "$bundle"/wheels "$bundle"/data/*
  echo "then, on the GPU machine from this checkout: scripts/gpu_bundle.sh run $bundle OUTDIR"
  ;;
run)
  out=${3:?OUTDIR}
  shift 3
  python=${PYTHON:-python3}
  site=$(mktemp -d /tmp/gpu-check-site.XXXX)
  data=$(mktemp -d /tmp/gpu-check-data.XXXX)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  for archive in "$bundle"/data/*.tar.gz; do tar xzf "$archive" -C "$data"; done
  mkdir -p "$out"
  check=$(mktemp -d /tmp/gpu-check.XXXX)
  # The check ends itself inside its --budget; the hard limit is for a step that will not stop.
  status=0
  timeout -k 10 "${GPU_CHECK_LIMIT:-570}" "$python" "$here/scripts/gpu_check.py" "$check" \
    --sample "$data/stanford-dogs-sample" --dogs51 "$data/dogs51" "$@" || status=$?
  tar czf "$out/gpu-check.tar.gz" --exclude=work -C "$check" .
  cp "$check/summary.md" "$out/" 2>/dev/null || true
  exit "$status"
  ;;
*)
  echo "error: the verbs are make and run" >&2
  exit 2
  ;;
esac
