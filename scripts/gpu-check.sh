#!/usr/bin/env bash
# The whole real-GPU check of issue 4 in one command, for a short lease of a GPU machine:
# scripts/gpu-compare.py with the GPU idle (once as configured by default, once with
# energy = false), then while a PyTorch bf16 matrix-product loop keeps it busy (utilization,
# power, clocks, GPM and a compute process then have values worth comparing), and
# scripts/nvml-call-cost.py idle and busy. Needs gpu-kit/ (bash scripts/gpu-kit.sh) and, for
# the busy runs, a python3 with torch; without torch only the idle runs are made.
# COMPARE=0 runs only nvml-call-cost.py.
#
#   bash scripts/gpu-check.sh OUT_DIR [gpu-compare.py options, e.g. --library-path]
#
# Writes in OUT_DIR: idle.md, lean.md, busy.md (comparisons), calls-idle.md, calls-busy.md
# (what each NVML call costs), log.txt and raw.tgz (each comparison's raw outputs).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu-check.sh OUT_DIR [gpu-compare.py options]}
shift
mkdir -p "$out"
raw=$(mktemp -d)
log="$out/log.txt"
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi -L
    nvidia-smi --version
    uname -r
    ldd --version | head -1
} >"$log" 2>&1

compare=${COMPARE:-1}
if [ "$compare" = 1 ]; then
    python3 scripts/gpu-compare.py --bin gpu-kit --seconds "${IDLE_SECONDS:-20}" \
        --out "$raw/idle" "$@" >"$out/idle.md" 2>&1
    echo "idle comparison exit: $?" >>"$log"
    # The cost without the energy counter (the one call that costs 4-6 ms on an H200).
    python3 scripts/gpu-compare.py --bin gpu-kit --seconds "${LEAN_SECONDS:-10}" \
        --out "$raw/lean" --set energy=false "$@" >"$out/lean.md" 2>&1
    echo "lean (energy = false) comparison exit: $?" >>"$log"
fi
python3 scripts/nvml-call-cost.py >"$out/calls-idle.md" 2>&1

if python3 -c "import torch; assert torch.cuda.is_available()" >>"$log" 2>&1; then
    python3 - "${BUSY_SECONDS:-10}" >>"$log" 2>&1 <<'LOAD' &
import sys, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
x = torch.randn(4096, 4096, device="cuda", dtype=torch.float32)
end = time.time() + 60 + float(sys.argv[1])
n = 0
while time.time() < end:
    for _ in range(20):
        c = a @ b
    x = torch.sin(x) * 1.0001  # some FP32 work beside the tensor cores
    torch.cuda.synchronize()
    n += 20
print(f"load: {n} bf16 8192^3 products", flush=True)
LOAD
    load=$!
    # Wait (at most 60 s) until the GPU is busy rather than for a fixed time.
    for _ in $(seq 120); do
        util=$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits | head -1)
        [ "${util:-0}" -ge 50 ] 2>/dev/null && break
        sleep 0.5
    done
    echo "utilization before the busy run: ${util:-?} %" >>"$log"
    if [ "$compare" = 1 ]; then
        python3 scripts/gpu-compare.py --bin gpu-kit --seconds "${BUSY_SECONDS:-10}" \
            --out "$raw/busy" "$@" >"$out/busy.md" 2>&1
        echo "busy comparison exit: $?" >>"$log"
    fi
    python3 scripts/nvml-call-cost.py >"$out/calls-busy.md" 2>&1
    nvidia-smi dmon -c 3 >>"$log" 2>&1
    kill "$load" 2>/dev/null
    wait "$load" 2>/dev/null
else
    echo "no torch with CUDA: busy comparison skipped" >>"$log"
fi

for run in idle lean busy; do
    [ -f "$raw/$run/metricsd.log" ] || continue
    echo "== metricsd log ($run): warnings and errors" >>"$log"
    grep -v ' INFO \| DEBUG ' "$raw/$run/metricsd.log" | head -40 >>"$log"
done
tar czf "$out/raw.tgz" -C "$raw" .
cat "$log"
