#!/usr/bin/env bash
# Everything to run on a GPU machine, in one call: the machine and versions, the Triton
# tests compiled on the GPU, and the benchmark. It uses the python3 that is there (with its own
# torch and triton) and this checkout's src/ on PYTHONPATH, so nothing needs installing; wheels
# under .whl/ (e.g. Liger-Kernel, for the peer comparison) are installed to /tmp/site first.
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]        # OUTDIR: $OUT, else benchmarks/results
#
# STAGES picks what runs (default "info tests profile bench compile"); each stage has a time limit
# (TESTS_S, BENCH_S, COMPILE_S seconds) so the whole call ends inside a fixed time budget, and the CSVs are
# written row by row, so a stage cut short still leaves its measurements.
set -u
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
stages=${STAGES:-info tests profile bench compile}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stamp=$(date -u +%Y-%m-%d)

if [[ $stages == *info* ]]; then
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
            --format=csv
        python3 -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "triton", triton.__version__); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, "SMs")'
        python3 -c 'import liger_kernel; print("liger-kernel", liger_kernel.__file__)' 2>&1 | tail -1
    } 2>&1 | tee "$out/gpu_info.txt"
fi

if [[ $stages == *tests* ]]; then
    TRITON_INTERPRET=0 timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider \
        tests/test_triton_interpreter.py -k "not compile_for_h100" --durations=5 -rf \
        --tb=short -p no:logging 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|^FAILED|Error"
fi

if [[ $stages == *profile* ]]; then
    for shape in 1,320,16,16 8,1280,64,64; do
        timeout 90 python3 benchmarks/profile_gpu_overhead.py --shape $shape 2>&1 | head -12
    done | tee "$out/gpu_profile.log"
fi

if [[ $stages == *bench* ]]; then
    timeout "${BENCH_S:-300}" python3 benchmarks/bench_triton_gpu.py --no-plot --rep "${REP:-50}" \
        --providers groupnorm,groupnorm-auto,torch,liger --out "$out/triton-${stamp}${TAG:-}.csv" ${BENCH_ARGS:-} \
        > "$out/gpu_bench.log" 2>&1
    tail -5 "$out/gpu_bench.log"
fi

if [[ $stages == *compile* ]]; then
    timeout "${COMPILE_S:-150}" python3 benchmarks/bench_triton_gpu.py --no-plot --rep "${REP:-50}" \
        --providers groupnorm,torch,torch.compile --quick \
        --out "$out/triton-compile-${stamp}.csv" ${COMPILE_ARGS:-} \
        > "$out/gpu_compile.log" 2>&1
    tail -5 "$out/gpu_compile.log"
fi
