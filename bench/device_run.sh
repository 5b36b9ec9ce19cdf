#!/usr/bin/env bash
# The one command for the GPU machine, from the repo root:  bash bench/device_run.sh
#   OUT=dir       where results go (default bench/results/run); at most 7 files (+SWEEPS), no subfolders
#   QUICK=1       fewer shapes/M and decode steps (~4 min instead of ~8)
#   SWEEPS=2      run the kernel sweep twice, in separate processes with half the time each, keep each
#                 run (kernels_*_run1.json, ...) and merge them (python -m bench.repro merge) into
#                 kernels_*.json, whose spread then covers run-to-run variation (bench/README.md,
#                 "Reproducibility"). Default 1. A full H200 sweep takes ~90 s, so 2 full sweeps
#                 need SKIP_TESTS=1; after the GPU tests (~230 s) each sweep gets 30-70 s and
#                 covers fewer shapes (the JSON's left_out says which).
#   ARCHS=90      CUDA architectures the install builds (default 90: H100/H200)
#   AUTO_TABLE=1  after the sweep, rewrite this GPU's backend="auto" table from it (bench.choose_backends)
#                 before the end-to-end runs; the table is copied to OUT to be committed
#   SKIP_TESTS=1  SKIP_KERNELS=1  SKIP_E2E=1  SKIP_INSTALL=1  skip a stage
#   DRY=1         CPU dry run of this script (no install, tiny shapes and model, --device cpu)
# Stages: nvidia-smi, pip install (builds the CUDA library), GPU tests, kernel benchmark,
# end-to-end 8B (fp16 vs int4) and 70B (int4), then the markdown report, printed last.
# Every stage has a time limit, so the whole script ends in under 9.5 minutes; a failing
# stage is reported and the next one still runs.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
# Everything imports int4ops from this checkout (the pip-installed copy may be missing or stale).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-bench/results/run}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${BUDGET:-545}
exec 3>&1 4>&2 > >(tee "$OUT/device_run.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - T0 )); }
stage() { echo; echo "=== [$(elapsed)s] $*"; }
# run_limited SECONDS cmd...: the stage gets at most SECONDS, and never past BUDGET seconds overall (default 545: the report and slack fit in 9.5 min).
run_limited() {
  local want=$1; shift
  local left=$(( BUDGET - $(elapsed) ))
  local lim=$(( want < left ? want : left ))
  if (( lim < 15 )); then echo "skipped: only ${left}s left of the ${BUDGET}s budget" >&2; return 124; fi
  timeout --signal=TERM --kill-after=10 "$lim" "$@"
  local rc=$?
  (( rc == 124 )) && echo "stage hit its ${lim}s limit" >&2
  return $rc
}

# Seconds kept back for the end-to-end stages (8B, 70B) when the kernel sweep is sized.
E2E_RESERVE=${E2E_RESERVE:-180}
[[ "${SKIP_E2E:-0}" == 1 ]] && E2E_RESERVE=0
if [[ "$QUICK" == 1 ]]; then
  KARGS="--quick"; TLIM_K=90; E2E8="--decode-steps 32"; E2E70="--decode-steps 16 --prefill-len 512"
else
  KARGS=""; TLIM_K=170; E2E8="--decode-steps 128"; E2E70="--decode-steps 32"
fi
if [[ "${DRY:-0}" == 1 ]]; then
  SKIP_INSTALL=1; KARGS="--device cpu --quick --budget 0.02 --reps 3"; TLIM_K=60
  E2E8="--model tiny --device cpu --decode-steps 4 --prefill-len 32"; E2E70="--model tiny --weights int4 --device cpu --decode-steps 4 --prefill-len 32"
fi

stage "machine"
nvidia-smi || true
$PY - <<'EOF' || true
import torch, platform
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton:", e)
try:
    import transformers; print("transformers", transformers.__version__)
except Exception as e: print("transformers:", e)
EOF

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  # ARCHS: CUDA architectures to build (H100/H200 are sm_90; fewer archs build faster).
  stage "pip install --no-build-isolation --no-deps . (CUDA archs ${ARCHS:-90})"
  LIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")/int4ops/lib/libint4ops_cuda.so
  CMAKE_ARGS="-DINT4OPS_CUDA_ARCHS=${ARCHS:-90} ${CMAKE_ARGS:-}" \
    run_limited 200 $PY -m pip install --no-build-isolation --no-deps . > /tmp/int4ops_pip.log 2>&1
  rc=$?; tail -n 25 /tmp/int4ops_pip.log; echo "pip install rc=$rc"
  if (( rc != 0 )) || [[ ! -f "$LIB" ]]; then
    # Seen on the lent machines: the pip build can fail there; the library itself builds
    # fine with CMake directly, and the tests/benchmarks run from this checkout anyway.
    stage "fallback: cmake build of the CUDA library"
    run_limited 120 bash -c "cmake -S . -B build/dev -G Ninja -DINT4OPS_CUDA=on -DINT4OPS_CUDA_ARCHS=${ARCHS:-90} \
      -DCMAKE_BUILD_TYPE=Release > /tmp/int4ops_cmake.log 2>&1 && cmake --build build/dev -j16 >> /tmp/int4ops_cmake.log 2>&1 \
      && cmake --install build/dev --prefix build/dev/prefix >> /tmp/int4ops_cmake.log 2>&1"
    echo "cmake rc=$?"; tail -n 5 /tmp/int4ops_cmake.log
    LIB=$PWD/build/dev/prefix/int4ops/lib/libint4ops_cuda.so
  fi
  # Tests and benchmarks run from this checkout (they import ./int4ops); point the loader at
  # the library that was built, wherever it went.
  if [[ -z "${INT4OPS_CUDA_LIB:-}" && -f "$LIB" ]]; then export INT4OPS_CUDA_LIB=$LIB; fi
  [[ -f "$LIB" ]] && { echo "ldd $LIB:"; ldd "$LIB"; }
fi
echo "INT4OPS_CUDA_LIB=${INT4OPS_CUDA_LIB:-<unset: default search>}"
$PY -c "import int4ops, int4ops.kernels.cuda as c; print('int4ops', int4ops.__file__); print('cuda library', c.library_info())" || true

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  stage "GPU tests (pytest -m gpu tests)"
  # -v: one line per test, so a stage cut off at its limit still names every failure so far.
  run_limited ${TLIM_TESTS:-200} $PY -m pytest -v -p no:cacheprovider --tb=short -m gpu tests 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -n 40
  RC_TESTS=$?; echo "gpu tests rc=$RC_TESTS"
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  stage "compute-sanitizer memcheck (CUDA library kernels, small shapes)"
  run_limited 60 compute-sanitizer --tool memcheck --leak-check no $PY csrc/tools/memcheck_cuda.py > "$OUT/memcheck.txt" 2>&1
  echo "memcheck rc=$?"; tail -n 3 "$OUT/memcheck.txt"
  stage "the README's main job on this GPU: int4ops (demo)"
  run_limited 60 $PY -m int4ops.cli -v 2>&1 | tail -n 20
fi

GPU=$($PY -c "import torch,re; n=torch.cuda.get_device_name(0).replace('NVIDIA',''); print(re.sub('[^a-z0-9]+','-',n.lower()).strip('-'))" 2>/dev/null || echo gpu)
DATE=$(date -u +%Y-%m-%d)
KJSON="$OUT/kernels_${GPU}_${DATE}.json"
EJSON="$OUT/e2e_${GPU}_${DATE}.json"
rm -f "$EJSON"

SWEEPS=${SWEEPS:-1}
if [[ "${SKIP_KERNELS:-0}" != 1 ]]; then
  # Each sweep starts no new shape after TLIM seconds: at most TLIM_K, and less when the
  # earlier stages ran long, so that E2E_RESERVE seconds stay for the end-to-end runs;
  # SWEEPS sweeps share that time (40 s each for start-up and the last shape's overrun).
  TLIM=$(( (BUDGET - $(elapsed) - E2E_RESERVE - 40 * SWEEPS) / SWEEPS )); (( TLIM > TLIM_K )) && TLIM=$TLIM_K; (( TLIM < 30 )) && TLIM=30
  if (( SWEEPS <= 1 )); then
    stage "kernel benchmark (python -m bench.kernels $KARGS --time-limit $TLIM)"
    run_limited $(( TLIM + 45 )) $PY -m bench.kernels $KARGS --time-limit $TLIM --no-plot --out "$KJSON" >/dev/null
    RC_K=$?; echo "kernels rc=$RC_K"
  else
    RUNS=(); RC_K=0; rm -f "$KJSON"  # never report a stale merge
    for i in $(seq 1 "$SWEEPS"); do
      stage "kernel benchmark, sweep $i of $SWEEPS (python -m bench.kernels $KARGS --time-limit $TLIM)"
      RJSON="${KJSON%.json}_run$i.json"; rm -f "$RJSON"
      run_limited $(( TLIM + 45 )) $PY -m bench.kernels $KARGS --time-limit $TLIM --no-plot --out "$RJSON" >/dev/null
      rc=$?; echo "kernels sweep $i rc=$rc"; (( rc != 0 )) && RC_K=$rc
      # A sweep cut off at its limit still wrote every finished shape: merge what exists.
      [[ -f "$RJSON" ]] && RUNS+=("$RJSON")
    done
    stage "merge ${#RUNS[@]} sweeps (python -m bench.repro merge)"
    if (( ${#RUNS[@]} > 0 )); then
      $PY -m bench.repro merge "${RUNS[@]}" --out "$KJSON"; rc=$?; echo "merge rc=$rc"; (( rc != 0 )) && RC_K=$rc
    else
      echo "no sweep wrote results"; RC_K=1
    fi
  fi
fi

if [[ "${AUTO_TABLE:-0}" == 1 && -f "$KJSON" ]]; then
  # Refresh this GPU's backend="auto" table from the sweep just measured, so the end-to-end
  # runs below use it; the updated table comes back in $OUT to be committed.
  stage "backend=auto table from this sweep (python -m bench.choose_backends)"
  $PY -m bench.choose_backends "$KJSON" && cp int4ops/kernels/auto_backend.json "$OUT/"
fi

if [[ "${SKIP_E2E:-0}" != 1 ]]; then
  stage "end to end: Llama-3-8B fp16 vs int4"
  run_limited $(( BUDGET - $(elapsed) - 90 )) $PY -m bench.e2e --model 8b $E2E8 --out "$EJSON" >/dev/null
  RC_E8=$?; echo "e2e 8b rc=$RC_E8"
  stage "end to end: Llama-3-70B int4 (built directly in int4)"
  run_limited $(( BUDGET - $(elapsed) - 10 )) $PY -m bench.e2e --model 70b $E2E70 --out "$EJSON" >/dev/null
  RC_E70=$?; echo "e2e 70b rc=$RC_E70"
fi

echo
echo "stage exit codes: gpu tests=${RC_TESTS:-skipped} kernels=${RC_K:-skipped} e2e 8b=${RC_E8:-skipped} e2e 70b=${RC_E70:-skipped} (124 = time limit)"
stage "report"
FILES=""; for f in "$KJSON" "$EJSON"; do [[ -f "$f" ]] && FILES="$FILES $f"; done
if [[ -n "$FILES" ]]; then
  # writes kernels_*.png next to the kernel JSON and report.md; the markdown is printed last
  $PY -m bench.report $FILES --out "$OUT/report.md" >/dev/null
  echo "report rc=$? | files in $OUT:"; ls -la "$OUT"
  echo "=== [$(elapsed)s] done"
  echo
  cat "$OUT/report.md"
else
  echo "no results to report"; ls -la "$OUT"
fi
# Let tee finish writing device_run.log before the script returns.
exec 1>&3 2>&4
wait "$TEE_PID" 2>/dev/null || true
# Non-zero when a benchmark stage failed (test failures are in gpu_tests.log and the line above).
exit $(( ${RC_K:-0} != 0 || ${RC_E8:-0} != 0 || ${RC_E70:-0} != 0 ))
