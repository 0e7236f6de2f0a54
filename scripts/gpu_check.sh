#!/usr/bin/env bash
# Every GPU check in one command: the `gpu` tests, fp16 (and int8 when calibrated) engines of the
# `small` preset, their validation against PyTorch, and the benchmark. Report: ${OUT:-gpu-report}/.
#
# On a machine without the project's venv, pass wheels in .whl/ (tensorrt, polygraphy,
# cuda-python and the project's runtime deps for that Python); they are installed into a target
# folder first. TensorRT itself cannot be downloaded here: bring its wheel or use JetPack's.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT="${OUT:-gpu-report}"
mkdir -p "$REPORT"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/fila-site .whl/*.whl && export PYTHONPATH="/tmp/fila-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: none"
  "$PY" -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>&1
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1
  [ -f /etc/nv_tegra_release ] && head -1 /etc/nv_tegra_release
} | tee "$REPORT/machine.txt"

status=0
step() { echo "== $*" | tee -a "$REPORT/steps.txt"; "$@" >>"$REPORT/steps.txt" 2>&1 || { status=1; echo "   FAILED" | tee -a "$REPORT/steps.txt"; }; }

step "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$REPORT/gpu-tests.xml"
W="${WORK:-build/gpu-check}"
mkdir -p "$W"
step "$PY" -m fila_export.cli init --preset small --out "$W/ckpt" --force
step "$PY" -m fila_export.cli export --checkpoint "$W/ckpt" --out "$W/art" --precision fp16 --force
step "$PY" -m fila_export.cli check-trt --artifacts "$W/art" --json "$REPORT/check-trt.json"
step "$PY" -m fila_export.cli build --artifacts "$W/art" --precision fp16 --timing-cache "$W/timing.cache"
cp "$W/art/engines/build_info.json" "$REPORT/build_info.json" 2>/dev/null
step "$PY" -m fila_export.cli validate --artifacts "$W/art" --checkpoint "$W/ckpt" --backend tensorrt \
  --precision fp16 --json "$REPORT/validate-trt-fp16.json"
if "$PY" -m fila_export.cli --help | grep -q calibrate; then
  step "$PY" -m fila_export.cli calibrate --artifacts "$W/art" --images fila_export/demo/examples/photos
  step "$PY" -m fila_export.cli build --artifacts "$W/art" --precision int8 --timing-cache "$W/timing.cache"
  step "$PY" -m fila_export.cli validate --artifacts "$W/art" --checkpoint "$W/ckpt" --backend tensorrt \
    --precision int8 --json "$REPORT/validate-trt-int8.json"
  # the portable decoder's int4 weight-only Q/DQ variant (W4A16): TensorRT's INT4 WoQ GEMMs
  step "$PY" -m fila_export.cli build --artifacts "$W/art" --precision w4 --timing-cache "$W/timing.cache"
  step "$PY" -m fila_export.cli validate --artifacts "$W/art" --checkpoint "$W/ckpt" --backend tensorrt \
    --precision w4 --json "$REPORT/validate-trt-w4.json"
fi
if "$PY" -m fila_export.cli --help | grep -q " bench"; then
  step "$PY" -m fila_export.cli bench --artifacts "$W/art" --checkpoint "$W/ckpt" \
    --backends torch,onnxruntime,tensorrt --precisions fp32,fp16,w4 --out "$REPORT/bench"
fi
echo "report in $REPORT (status $status)"
exit $status
