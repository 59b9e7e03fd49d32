#!/bin/bash
# The GPU checks of issues 22-24 in one call of a lent H100/H200 (a session has 15 minutes of device time, the
# machine's start included): the GPU tests, compute-sanitizer memcheck and racecheck over the CUDA kernels, and the
# benchmarks whose targets only a GPU can show. Everything is prepared on the CPU machine first:
#
#   # 1. the module for the device's Python 3.12 and sm_90, built here (no compiling there):
#   python3.12 -m venv /tmp/v312 && /tmp/v312/bin/pip install -q pybind11 cmake ninja numpy
#   cmake -S . -B build312 -G Ninja -DAUVCORE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
#         -DPython_EXECUTABLE=/tmp/v312/bin/python -Dpybind11_DIR=$(/tmp/v312/bin/python -m pybind11 --cmakedir)
#   cmake --build build312 -j2          # writes auvcore/_C.cpython-312-x86_64-linux-gnu.so into the tree
#   # 2. the packages the device lacks, as wheels (.whl, ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 -d .whl nibabel pynrrd slicerio monai cleanlab==2.9.0
#   # 3. two device calls, the checks then the benchmarks (carry the module and the wheels):
#   run(command="bash bench/gpu_session.sh check", carry=[".whl", "auvcore/_C.cpython-312-x86_64-linux-gnu.so"],
#       timeout_s=480)
#   run(command="bash bench/gpu_session.sh bench", carry=[...the same...], timeout_s=480)
#
# Each step has its own time limit (the sums stay under 7 minutes per part) and its log; a failing step does not
# stop the next. The summary (last lines of the output) gives each step's exit code and seconds;
# $OUT/gpu_logs-<part>.tgz holds every log.
set -u
OUT=${OUT:-/tmp/auvcore_gpu}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1
git log -1 --format='%h %cI %s' > "$LOGS/commit.txt" 2>/dev/null

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -1 "$LOGS/$name.log" | cut -c1-90)" |
    tee -a "$LOGS/summary.txt"
}
PART=${1:-check}
SAN="compute-sanitizer --error-exitcode 9 --print-limit 20"
GPU_TESTS="tests/test_cuda_gpu.py tests/test_cuda_eigvec_emulated.py::test_eigenpairs_on_the_gpu_match_lapack_and_are_bit_identical
 tests/test_distributed.py::test_device_cuda_gives_the_cpu_table tests/test_data.py::test_resample_on_the_gpu_is_scipys
 tests/test_integrations.py::test_monai_example_trains_on_the_gpu_with_the_cuda_kernels
 tests/test_integrations.py::test_nnunet_loss_on_the_gpu_uses_the_cuda_kernels_and_matches_the_cpu"

if [ "$PART" = check ]; then
  # correctness first: every GPU test, then the kernels under the sanitizer (the S backward's former
  # out-of-bounds read, the eigenpairs kernel, the DUO kernels)
  step gpu-tests 120 python3 -m pytest -q -rs $GPU_TESTS
  step memcheck 110 $SAN --tool memcheck python3 -m pytest -q -x tests/test_cuda_gpu.py -k "backward or duo or eig"
  step racecheck 90 $SAN --tool racecheck python3 -m pytest -q -x tests/test_cuda_gpu.py -k "backward or eig"
  # the Gram's tensor-core engine (issue 24), not the default until these pass: the S tests, then both sanitizers
  step tc-tests 40 env AUVCORE_CUDA_GRAM=3xtf32 python3 -m pytest -q -x tests/test_cuda_gpu.py -k "not duo and not backward"
  step tc-memcheck 30 env AUVCORE_CUDA_GRAM=3xtf32 $SAN --tool memcheck python3 -m pytest -q -x tests/test_cuda_gpu.py -k "decoded or masked"
  step tc-racecheck 30 env AUVCORE_CUDA_GRAM=3xtf32 $SAN --tool racecheck python3 -m pytest -q -x tests/test_cuda_gpu.py -k "decoded or masked"
else
  # the cost targets (issue 22): DUO against Dice+BCE, float32 and bfloat16 autocast, at the issue's size
  step duo-f32 50 python3 bench/bench_duo.py --device cuda --B 2 --K 14 --size 128
  step duo-bf16 50 python3 bench/bench_duo.py --device cuda --B 2 --K 14 --size 128 --dtype bfloat16
  # the S kernels against their floors and CuPy (issues 23, 24)
  step scale 60 python3 bench/bench_cuda.py --skip-svd-loop
  step scale-tc 40 env AUVCORE_CUDA_GRAM=3xtf32 python3 bench/bench_cuda.py --skip-svd-loop --cases decoded-small,decoded-stream
  # the main job on the GPU (issue 23): 48 demo cases, random Merlin, float32 and bfloat16, loader workers
  step scoring 120 python3 bench/bench_scoring.py --cases 48 --encoders merlin --weights random --device cuda \
    --dtype float32 bfloat16 --configs 1x0 1x4
  # label QC on the GPU (issue 21): 100 demo-size cases, the main job with its QC step
  step qc100 100 python3 -m auvcore demo --cases 100 --out /tmp/qc100 --weights random --device cuda --no-progress
fi

tar czf "$OUT/gpu_logs-$PART.tgz" -C "$OUT" logs
cat "$LOGS/gpu.txt" "$LOGS/summary.txt"
