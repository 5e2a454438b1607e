#!/usr/bin/env bash
# The attention study's full grid (issue 17) on one GPU, meant for the device tool:
#
#   run(command="bash benchmarks/study_gpu.sh", carry=[".whl", "runs/attention-study"], timeout_s=600)
#
# What the GPU image lacks travels as wheels in .whl/ (see the device README; benchmarks/gpu_run.sh
# of issue 16 prepares the same set): pycocotools, faster-coco-eval, albumentations (+ albucore,
# simsimd, stringzilla, pydantic ... as its METADATA lists), and jsonargparse with docstring-parser
# and typeshed-client (LightningCLI). The script stops at once, naming what is missing, rather than
# spending device time.
#
# One call trains as many runs as fit in STUDY_BUDGET seconds (default 420, inside the tool's
# 10-minute limit), writes attention-study-gpu.{md,json,png} for the variants whose seeds are all
# done, and packs every finished run (config, predictions, report, result; no checkpoints) into
# $OUT/study-runs.tar.gz. To finish the grid in a later session, unpack that tarball here
# (tar xzf .../study-runs.tar.gz) and call the tool again with runs/attention-study in carry: the
# runner skips every verified run. For the final table with 1000 bootstrap replicates, on a CPU:
#
#   python benchmarks/attention_study.py <the GPU arguments below> --analyze-only --n-boot 1000
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 VISATTN_CACHE=${VISATTN_CACHE:-/tmp/visattn-cache}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
BUDGET=${STUDY_BUDGET:-420}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # visattn from this tree
missing=$("$PY" - <<'EOF'
import importlib.util as u
mods = ["torch", "torchvision", "timm", "lightning", "jsonargparse", "docstring_parser", "pycocotools",
        "faster_coco_eval", "albumentations", "matplotlib", "yaml", "safetensors"]
print(" ".join(m for m in mods if u.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "study_gpu.sh: missing Python packages: $missing; carry their wheels in .whl/ (see the top of this file)" >&2
  exit 3
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

# keep these arguments in step with GPU_ARGS in benchmarks/attention_study.py
ARGS=(--accelerator gpu --seeds 3 --max-epochs 12 --val-every 3 --parallel 8 --threads 2)
status=0
"$PY" benchmarks/attention_study.py "${ARGS[@]}" --time-budget "$BUDGET" --n-boot 200 --out-dir "$OUT" "$@" \
  2>&1 | tee "$OUT/study-log.txt" || status=$?
find runs/attention-study -name result.json -printf '%h\n' | while read -r d; do
  for f in study-config.yaml config.yaml predictions.json result.json report/report.json report/report.md log.txt; do
    [ -f "$d/$f" ] && echo "$d/$f"
  done
done > /tmp/study-files.txt
tar czf "$OUT/study-runs.tar.gz" -T /tmp/study-files.txt
ls -la "$OUT"
exit $status
