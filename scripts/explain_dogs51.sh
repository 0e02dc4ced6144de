#!/usr/bin/env bash
# Calibration, "unsure" and activation maps on real photos (BENCHMARKS.md, "Calibrated confidence, …: dogs51"):
# the stand-in study's three regimes re-exported (temperature, threshold, maps) and evaluated on test, and regime 1
# fine-tuned at 128 px (4 × 4 maps instead of 2 × 2), once as the study trains and once more without label smoothing.
# Needs scripts/standin_study.sh's runs (artifacts/runs/dogs51-cpu) and its prepared dogs51. Each step is skipped
# when its output exists; about 70 min on a 2-core CPU, most of it the 128 px training.
set -euo pipefail
cd "$(dirname "$0")/.."
dogkit=dogkit
[ -x .venv/bin/dogkit ] && dogkit=.venv/bin/dogkit
study=artifacts/runs/dogs51-cpu
copies=artifacts/runs/dogs51-explain  # copies, so that the study's own exports and benchmarks stay as it made them
fine=artifacts/runs/dogs51-128
for exp in 1 2 3; do
  run=$copies/study-cpu-exp$exp
  if [ ! -f "$run/model.onnx" ]; then
    mkdir -p "$run"
    cp "$study/study-cpu-exp$exp"/{best.pt,config.json,environment.json,metrics.csv,run.log,test_metrics.json,test_predictions.npz} "$run/"
    $dogkit export "$run"
  fi
  [ -f "$run/eval/onnx-model-test/metrics.json" ] || $dogkit eval --backend onnx --model "$run/model.onnx" --split test
done
$dogkit report "$copies"/study-cpu-exp{1,2,3} --out docs/results/dogs51-explain
if [ ! -f "$fine/r1-128px/test_metrics.json" ]; then
  $dogkit train --config "$study/study-cpu-exp1/config.json" --weights "$study/study-cpu-exp1/best.pt" \
    --image-size 128 --epochs 6 --lr 1e-4 --name r1-128px --runs-dir "$fine"
fi
if [ ! -f "$fine/r1-128px-hard/test_metrics.json" ]; then
  $dogkit train --config "$fine/r1-128px/config.json" --weights "$fine/r1-128px/best.pt" --epochs 3 --lr 1e-4 \
    --label-smoothing 0 --name r1-128px-hard --runs-dir "$fine"
fi
for run in "$fine/r1-128px" "$fine/r1-128px-hard"; do
  [ -f "$run/model.onnx" ] || $dogkit export "$run"
  [ -f "$run/eval/onnx-model-test/metrics.json" ] || $dogkit eval --backend onnx --model "$run/model.onnx" --split test
done
# The 128 px model's most confident mistakes with their maps, beside the 64 px study's report.
$dogkit report "$fine/r1-128px" --out "$fine/report"
cp "$fine/report/gallery.png" docs/results/dogs51-explain/gallery-128px.png
