#!/usr/bin/env bash
# The study on real photos without ImageNet weights: pretrain ResNet50 from scratch on dogs69-crops (69 breeds,
# box crops), fine-tune it on dogs51 (51 other breeds, full photos) as regimes 1 and 2, train regime 3 on dogs51
# from scratch, then export, evaluate with ONNX Runtime, benchmark and report. Resumable: run it again after
# Ctrl-C. Results are a stand-in for ImageNet pretraining and are labelled so.
#
#   scripts/standin_study.sh                 # budget cpu: 64 px, about an hour on a 2-core CPU
#   scripts/standin_study.sh gpu             # budget gpu: 112 px, three seeds per regime
#   scripts/standin_study.sh cpu --seeds 0,1,2   # any further option goes to `dogkit study`
#
# DOGKIT_SHARED_DATA: the folder holding dogs51/ and dogs69-crops/ (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${DOGKIT_SHARED_DATA:-../shared/data}
budget=${1:-cpu}
shift || true
dogkit=dogkit
[ -x .venv/bin/dogkit ] && dogkit=.venv/bin/dogkit
for set in "$shared/dogs51" "$shared/dogs69-crops/Images"; do
  [ -d "$set" ] || { echo "error: $set not found; set DOGKIT_SHARED_DATA to the folder with dogs51/ and dogs69-crops/" >&2; exit 2; }
done
exec "$dogkit" study --budget "$budget" \
  --source "$shared/dogs51" --data artifacts/data/dogs51 \
  --pretrain-source "$shared/dogs69-crops/Images" --pretrain-data artifacts/data/dogs69-crops \
  --runs-dir "artifacts/runs/dogs51-$budget" --out "artifacts/reports/dogs51-$budget" "$@"
