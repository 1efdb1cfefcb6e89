#!/usr/bin/env bash
# Run the checks that need a GPU: the device tests (tests/test_device.py), then the
# set-to-model layer benchmark on that device.
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
# script takes at most about 10 minutes.
#
# NOTE: this script has run only with S2M_TEST_DEVICE=cpu, so its CUDA timing is an estimate.
set -uo pipefail

output_dir="device-check"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    output_dir="$1"
    shift
fi
device="${S2M_TEST_DEVICE:-cuda}"
python="${PYTHON:-python3}"
timeout_s="${BENCH_TIMEOUT_S:-480}"

mkdir -p "$output_dir" || exit 1
output_dir="$(cd "$output_dir" && pwd)"
repository="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository" || exit 1
export PYTHONPATH="$repository${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 S2M_TEST_DEVICE="$device"

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$output_dir/machine.txt"

# Without this check, pytest would skip every device test and still exit with 0.
if ! "$python" -c "import sys, torch; torch.empty(1, device=sys.argv[1])" "$device" >>"$output_dir/machine.txt" 2>&1; then
    echo "torch cannot use device '$device' (see $output_dir/machine.txt). Set S2M_TEST_DEVICE to a device torch can use." >&2
    exit 1
fi

"$python" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$output_dir/device_tests.log"
tests_status=${PIPESTATUS[0]}

cp docs/benchmarks.md "$output_dir/benchmarks.md"
timeout "$timeout_s" "$python" benchmarks/bench_mixture.py --device "$device" \
    --dense-time-limit-s 30 --output "$output_dir/benchmarks.md" "$@" 2>&1 | tee "$output_dir/bench.log"
bench_status=${PIPESTATUS[0]}
if [ "$bench_status" -eq 124 ]; then
    echo "The benchmark timed out after $timeout_s s, so $output_dir/benchmarks.md is unchanged." \
        "Raise BENCH_TIMEOUT_S, or pass --quick." | tee -a "$output_dir/bench.log"
fi

echo "device $device: tests exit status $tests_status, benchmark exit status $bench_status" | tee -a "$output_dir/machine.txt"
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
    exit 1
fi
