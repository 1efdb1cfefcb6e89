#!/usr/bin/env bash
# Run the checks that need a GPU, from the repository root: the device tests
# (tests/test_device.py), then the set-to-model layer benchmark on that device.
#
#   bash benchmarks/device_check.sh [OUTPUT_DIR] [BENCHMARK OPTIONS...]
#
# The device is $S2M_TEST_DEVICE, cuda when unset. OUTPUT_DIR (default: device-check)
# receives the logs and a copy of docs/benchmarks.md with the device's section filled in.
# The checkout itself is not modified, so the copy replaces the checked-in page by hand.
# Options after OUTPUT_DIR go to benchmarks/bench_mixture.py, for example --quick.
#
# s2m is imported from this checkout, so the script also runs where the project is not
# installed. It needs torch, numpy, scikit-learn, threadpoolctl, pytest, tqdm and PyYAML.
# The benchmark stops after $BENCH_TIMEOUT_S seconds (default 480), so that the whole
# script fits in about 10 minutes.
set -uo pipefail

output_dir="${1:-device-check}"
shift || true
device="${S2M_TEST_DEVICE:-cuda}"
python="${PYTHON:-python3}"
mkdir -p "$output_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 S2M_TEST_DEVICE="$device"

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$output_dir/machine.txt"

"$python" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$output_dir/device_tests.log"
tests_status=${PIPESTATUS[0]}

cp docs/benchmarks.md "$output_dir/benchmarks.md"
timeout "${BENCH_TIMEOUT_S:-480}" "$python" benchmarks/bench_mixture.py --device "$device" \
    --dense-time-limit-s 30 --output "$output_dir/benchmarks.md" "$@" 2>&1 | tee "$output_dir/bench.log"
bench_status=${PIPESTATUS[0]}

echo "device $device: tests exit status $tests_status, benchmark exit status $bench_status" | tee -a "$output_dir/machine.txt"
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
    exit 1
fi
