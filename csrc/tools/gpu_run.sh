#!/bin/bash
# One GPU session: build + install, ldd, GPU tests, memcheck, benchmark. Results under $OUT.
# Usage (repo root, on a GPU machine): OUT=/tmp/out bash csrc/tools/gpu_run.sh
# pip install needs scikit-build-core importable (optionally from build/pydeps); without it the
# script builds with cmake directly and points INT4OPS_CUDA_LIB at that build.
set -u
# The tools import int4ops from this checkout (the installed copy may be missing or stale).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/int4ops_gpu_out}; mkdir -p "$OUT"
ARCHS=${ARCHS:-90}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
# pip needs scikit-build-core; a machine without it (and without a registry) builds with CMake.
if PYTHONPATH=$PWD/build/pydeps${PYTHONPATH:+:$PYTHONPATH} CMAKE_ARGS="-DINT4OPS_CUDA_ARCHS=$ARCHS" pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  LIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")/int4ops/lib/libint4ops_cuda.so
  echo "built with pip install ." | tee -a "$OUT/gpu.txt"
else
  mv "$OUT/build.log" "$OUT/build_pip.log"; tail -3 "$OUT/build_pip.log"
  cmake -S . -B build/gpu -G Ninja -DINT4OPS_CUDA=on -DINT4OPS_CUDA_ARCHS=$ARCHS -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 \
    && cmake --build build/gpu -j16 >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  cmake --install build/gpu --prefix build/gpu/prefix >> "$OUT/build.log" 2>&1
  LIB=$PWD/build/gpu/prefix/int4ops/lib/libint4ops_cuda.so
  echo "pip build failed (no scikit-build-core?); built with cmake directly, installed to $LIB" | tee -a "$OUT/gpu.txt"
fi
echo "build+install: $(( $(date +%s) - t0 )) s (archs $ARCHS)" | tee -a "$OUT/gpu.txt"
ldd "$LIB" | tee "$OUT/ldd.txt"
export INT4OPS_CUDA_LIB=$LIB
python -c "from int4ops.kernels import cuda; print(cuda.library_info()); print('why_unavailable:', repr(cuda.why_unavailable('cuda')))" 2>&1 | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-100} python -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/test_cuda_backend.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|Error|error" "$OUT/pytest.txt" | tail -25
timeout ${MEMCHECK_TIMEOUT:-70} compute-sanitizer --tool memcheck --leak-check no python csrc/tools/memcheck_cuda.py > "$OUT/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -6 "$OUT/memcheck.txt"
timeout ${BENCH_TIMEOUT:-90} python csrc/tools/bench_cuda.py --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
