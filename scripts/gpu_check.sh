#!/usr/bin/env bash
# Every GPU check in one command. Report: ${OUT:-gpu-report}/ (summary.txt says what passed,
# failed and was skipped; a skipped check is never counted as a pass).
#
#   scripts/gpu_check.sh workstation        the full chain on a desktop GPU: the `gpu` tests,
#                                           init/export/record (torch), build, validate, bench
#   scripts/gpu_check.sh board ARTIFACTS    on a Jetson, from an export made on a workstation
#                                           with `fila validate --record`: doctor, check-trt,
#                                           build, validate --reference, bench with power; no torch
# The mode defaults to `board` where /etc/nv_tegra_release exists, else `workstation`.
#
# Without the project's venv, pass wheels in .whl/ (tensorrt, cuda-python and the
# runtime's deps for that Python); they are installed into a target folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-$([ -f /etc/nv_tegra_release ] && echo board || echo workstation)}"
REPORT="${OUT:-gpu-report}"
mkdir -p "$REPORT"
: >"$REPORT/summary.txt"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/fila-site .whl/*.whl && export PYTHONPATH="/tmp/fila-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
FILA=("$PY" -m fila_export.cli)

passed=0 failed=0 skipped=0
note() { echo "$1 $2" | tee -a "$REPORT/summary.txt"; }
step() {  # step NAME CMD...: a check that passes or fails
  local name=$1; shift
  echo "== $name: $*" >>"$REPORT/steps.txt"
  if "$@" >>"$REPORT/steps.txt" 2>&1; then passed=$((passed + 1)); note PASS "$name"
  else failed=$((failed + 1)); note FAIL "$name"; fi
}
skip() { skipped=$((skipped + 1)); note SKIP "$1 ($2)"; }

gpu_tests() {  # the pytest `gpu` marker; skipped tests are counted as skipped, not passed
  if ! "$PY" -c "import torch" 2>/dev/null; then skip "gpu tests" "torch is not installed here"; return; fi
  step "gpu tests" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs --junitxml="$REPORT/gpu-tests.xml"
  local n
  n=$("$PY" -c "import sys,xml.etree.ElementTree as E; r=E.parse(sys.argv[1]).getroot(); s=r if r.tag=='testsuite' else r[0]; print(s.get('skipped','0'))" "$REPORT/gpu-tests.xml" 2>/dev/null || echo 0)
  [ "${n:-0}" -gt 0 ] && skip "gpu tests: $n test(s)" "see steps.txt for the reasons"
}

validate_and_bench() {  # ART, then how validate compares (--reference or --checkpoint CKPT)
  local art=$1; shift
  for p in fp16 int8 w4; do
    if "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); sys.exit(0 if any('$p' in s['variants'] for s in m['stages'].values()) else 1)" "$art/manifest.json"; then
      step "build $p" "${FILA[@]}" build --artifacts "$art" --precision "$p" --timing-cache "$art/timing.cache"
      step "validate tensorrt $p" "${FILA[@]}" validate --artifacts "$art" "$@" --backend tensorrt \
        --precision "$p" --json "$REPORT/validate-trt-$p.json"
    else
      skip "build/validate $p" "the export has no $p variant"
    fi
  done
  cp "$art/engines/build_info.json" "$REPORT/build_info.json" 2>/dev/null
}

ART="${2:-}"
if [ "$MODE" = board ] && { [ -z "$ART" ] || [ ! -f "$ART/manifest.json" ]; }; then
  echo "board mode needs ARTIFACTS: an export made on a workstation (with fila validate --record)" >&2
  exit 2
fi
{
  echo "# GPU check ($MODE) $(date -u +%FT%TZ)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  else echo "nvidia-smi: none"; fi
  [ -f /etc/nv_tegra_release ] && head -1 /etc/nv_tegra_release
} | tee "$REPORT/machine.txt"
"${FILA[@]}" doctor --json "$REPORT/doctor.json" | tee -a "$REPORT/machine.txt"

case "$MODE" in
  workstation)
    gpu_tests
    W="${WORK:-build/gpu-check}"
    mkdir -p "$W"
    step init "${FILA[@]}" init --preset small --out "$W/ckpt" --force
    step export "${FILA[@]}" export --checkpoint "$W/ckpt" --out "$W/art" --precision fp16 --force
    step calibrate "${FILA[@]}" calibrate --artifacts "$W/art" --images fila_export/demo/examples/photos --llm w4
    step "record reference" "${FILA[@]}" validate --record --artifacts "$W/art" --checkpoint "$W/ckpt"
    step check-trt "${FILA[@]}" check-trt --artifacts "$W/art" --json "$REPORT/check-trt.json"
    validate_and_bench "$W/art" --checkpoint "$W/ckpt"
    step bench "${FILA[@]}" bench --artifacts "$W/art" --checkpoint "$W/ckpt" \
      --backends torch,onnxruntime,tensorrt --precisions fp16,w4 --out "$REPORT/bench"
    ;;
  board)
    gpu_tests
    step verify "${FILA[@]}" verify "$ART"
    step check-trt "${FILA[@]}" check-trt --artifacts "$ART" --json "$REPORT/check-trt.json"
    validate_and_bench "$ART" --reference
    step bench "${FILA[@]}" bench --artifacts "$ART" --backends onnxruntime,tensorrt \
      --providers cuda --precisions fp16,w4 --contexts 128,1024 --out "$REPORT/bench"
    ;;
  *) echo "unknown mode $MODE: use workstation or board" >&2; exit 2 ;;
esac
echo "passed $passed, failed $failed, skipped $skipped: report in $REPORT" | tee -a "$REPORT/summary.txt"
[ "$failed" -eq 0 ] && [ "$skipped" -eq 0 ] && exit 0
[ "$failed" -gt 0 ] && exit 1
exit 3  # nothing failed, but not everything ran
