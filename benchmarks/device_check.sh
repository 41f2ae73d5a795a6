#!/usr/bin/env bash
# One script for a lent accelerator (under 8 minutes on one GPU): round throughput of every
# backend on the quickstart, one full-size KiTS23 round, dp_overhead, FLOP utilisation against the
# measured float32 and bfloat16 matmul peaks, peak device memory, and the 3D memory table.
#
#   benchmarks/device_check.sh [OUT]          # OUT defaults to runs/device_check
#   SMOKE=1 benchmarks/device_check.sh /tmp/dc   # CPU-sized (smoke configs), minutes on CPU
#
# Each step's log and its last (JSON) line go to OUT; OUT/device_check.json collects them.
# PYTHON (default: .venv/bin/python if present, else python3) runs the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/device_check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ -n "${SMOKE:-}" ]; then
  QUICK=(--config quickstart:smoke --rounds 2)
  KITS=(--config kits23:smoke --backends map --rounds 1)
  MEM=(--set data.volume_shape=8,16,16 --microbatches 0 2)
  LIMITS=(900 600 300)  # CPU compiles of four backends take minutes
else
  QUICK=(--config quickstart --rounds 3)
  KITS=(--config kits23 --backends vmap --rounds 1)
  MEM=(--microbatches 0 1 2 4)
  LIMITS=(180 180 120)  # seconds; 8 minutes at most in all
fi

step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, keeps its log and JSON line
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
}

step quickstart "${LIMITS[0]}" "$PY" benchmarks/round_throughput.py "${QUICK[@]}" --json
step kits23_round "${LIMITS[1]}" "$PY" benchmarks/round_throughput.py "${KITS[@]}" --json
step memory3d "${LIMITS[2]}" "$PY" benchmarks/memory3d.py "${MEM[@]}" --json

"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
report = {name: json.load(open(os.path.join(out, f'{name}.json')))
          for name in ('quickstart', 'kits23_round', 'memory3d')}
json.dump(report, open(os.path.join(out, 'device_check.json'), 'w'), indent=2)
q, k = report['quickstart'], report['kits23_round']
num = lambda v, f='{:.3f}': 'n/a' if v is None else f.format(v)
print(f"\ndevice: {q['device']} x{q['device_count']}")
print('quickstart s/round: ' + ', '.join(f'{b} {t:.4f}' for b, t in q['backends'].items()))
print('kits23 round: ' + ', '.join(f'{b} {t:.3f} s' for b, t in k['backends'].items()))
for name, r in (('quickstart', q), ('kits23', k)):
  gib = None if r['peak_bytes'] is None else r['peak_bytes'] / 2**30
  print(f"{name}: dp_overhead {r['dp_overhead']:.2f}, flop_utilization "
        f"{num(r['flop_utilization'])} (float32 peak), {num(r['flop_utilization_bf16'])} "
        f"(bfloat16 peak), peak memory {num(gib, '{:.2f} GiB')}")
for row in report['memory3d']['rows']:
  print(f"memory3d microbatch {row['microbatch'] or 'off'}: temp {row['temp_bytes'] / 2**20:.1f} MiB")
print(f"wrote {os.path.join(out, 'device_check.json')}")
PYEOF
