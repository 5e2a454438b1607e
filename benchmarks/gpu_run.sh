#!/usr/bin/env bash
# The GPU run of issue 16, as one command for a session that has a CUDA machine (the device tool).
#
# 1. Here, on the development machine (needs PyPI; once per machine, ~10 MiB):
#        bash benchmarks/gpu_run.sh fetch-wheels
#    downloads, into the git-ignored .whl/, the wheels the GPU image lacks (Python 3.12, x86-64):
#    pycocotools, faster-coco-eval, albumentations (+ albucore, simsimd, stringzilla, pydantic and
#    its parts), jsonargparse[signatures] (the LightningCLI behind train.py) and typing_extensions.
# 2. On the GPU machine, through the device tool:
#        run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#    It installs the wheels into /tmp/site, runs the CUDA tests of the fused gates, then
#    benchmarks/gpu.py (train.py fit + validate on configs/gpu.yaml, gate blocks, detector and timm
#    training throughput, self-attention), under a time budget so the whole run ends inside the
#    device tool's 10-minute limit. Everything comes back in $OUT: the results file
#    (gpu-<device>.md, to commit as benchmarks/results/gpu-<device>.md), the test log, nvidia-smi.
#    Sections the budget left out are listed as not run; run them in a second call with
#        bash benchmarks/gpu_run.sh --sections compiled,self
#    (any further arguments go to benchmarks/gpu.py; the tests then are skipped).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "fetch-wheels" ]]; then
    mkdir -p .whl
    py=.venv/bin/python
    [[ -x $py ]] || py=python3
    exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        pycocotools==2.0.11 faster-coco-eval==1.8.0 albumentations==2.0.8 albucore==0.0.24 \
        simsimd==6.5.16 stringzilla==5.3.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing_extensions==4.16.0 jsonargparse==4.53.0 docstring_parser==0.18.0 \
        typeshed_client==2.15.0
fi

START=$SECONDS
OUT=${OUT:-/tmp/visattn-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash benchmarks/gpu_run.sh fetch-wheels' here and carry .whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, torchvision, timm, lightning, jsonargparse, pycocotools, faster_coco_eval, albumentations; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'timm', timm.__version__)" || exit 4

if [[ $# -eq 0 ]]; then
    # the fused kernels against the plain path on CUDA (fp32 / bf16 / fp16, NCHW / channels-last)
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_fused.py -k cuda 2>&1 | tee "$OUT/pytest-cuda.log"
fi
# what is left of the device tool's 600 s, less a margin for copying the results back
BUDGET=$(( 540 - (SECONDS - START) ))
python3 benchmarks/gpu.py --budget-s "$BUDGET" --work-dir /tmp/visattn-gpu-work --results-dir "$OUT" \
    --train-timeout-s 200 --train-images 384 --val-images 96 --detector-compiled none,se "$@" 2>&1 | tee "$OUT/gpu-py.log"
echo "gpu_run.sh: $((SECONDS - START)) s"
