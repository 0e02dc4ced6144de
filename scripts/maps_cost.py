"""What the activation maps output costs (BENCHMARKS.md, "What the activation maps cost"): a ResNet50 with a 120-way
head (random weights: speed does not depend on them) exported at 224 px with its maps, then one `dogkit bench` run
over the three ways to run it, and a second in the opposite order.

    python scripts/maps_cost.py [--out artifacts/explain]
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.training.export import add_metadata, export_onnx
from dogkit.training.models import build_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("artifacts/explain"))
parser.add_argument("--min-time", default="10")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
model = args.out / "resnet50-224-maps.onnx"
if not model.is_file():
    spec = PreprocessSpec.for_size(224)
    torch.manual_seed(0)
    export_onnx(build_model("resnet50", 120, spec=spec).eval(), spec, model, maps=True)
    add_metadata(model, {"class_names": [f"breed {i}" for i in range(120)], "preprocess": spec.to_json()})
for name, order in (("bench-maps-224", "onnx-no-maps,onnx,onnx-explain"),
                    ("bench-maps-224-reversed", "onnx-explain,onnx,onnx-no-maps")):
    subprocess.run([sys.executable, "-m", "dogkit", "bench", "--model", str(model), "--backends", order,
                    "--batch-sizes", "1,8,32", "--min-time", args.min_time, "--json", str(args.out / f"{name}.json"),
                    "--markdown", str(args.out / f"{name}.md")], check=True)
