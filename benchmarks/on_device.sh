#!/usr/bin/env bash
# The benchmarks' GPU run, prepared to be one call of a lent accelerator machine.
#
# The issues ask for the DEQ backward (dense, conv, multiscale) and the PES overhead
# tables on a GPU too, "when a task has one"; a task gets ~15 minutes of device time,
# all tries together, so this is one script of bounded sections, each with its own
# timeout, whose outputs land in $OUT (the tool's folder that comes back) or in
# outputs/device. Nothing here is needed on a CPU, and CI never runs it.
#
# The machine's image has jax (CUDA), equinox, optax, flax, lineax, optimistix and
# scikit-learn, but not jaxopt, evosax or evosax's dotmap (pure-Python wheels). Fetch
# them here once, into .whl (which .gitignore lists):
#
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#         jaxopt==0.8.5 evosax==0.3.2 dotmap==1.3.30
#
# then call the device tool with `command="bash benchmarks/on_device.sh"`,
# `carry=[".whl"]` and `timeout_s=420` (the sections below sum to at most 390 s, so
# that a second try still fits the budget). optax_pes itself travels with the
# working tree and is imported from it (PYTHONPATH), not installed.
#
#     QUICK=1 bash benchmarks/on_device.sh     # a smoke run of every section, here
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-outputs/device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

section() {  # section NAME SECONDS COMMAND...: run it, tee its output, go on if it fails
    local name="$1" seconds="$2"
    shift 2
    printf '\n==== %s (at most %ss) ====\n' "$name" "$seconds" | tee -a "$OUT/summary.txt"
    local started=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    printf '(%s: exit %s after %ss)\n' "$name" "${PIPESTATUS[0]}" \
        "$((SECONDS - started))" | tee -a "$OUT/summary.txt"
}

python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import jax, optax, equinox
print("jax", jax.__version__, "| optax", optax.__version__, "| equinox",
      equinox.__version__, "|", jax.devices())
EOF

if [ "${QUICK:-0}" = "1" ]; then
    section deq_backward 300 python3 benchmarks/deq_backward.py --quick --skip-forward
    section pes_overhead 300 python3 benchmarks/pes_overhead.py --quick \
        --systems infl --sections overhead
else
    # Dense and conv layers at the issues' sizes, the MDEQ, the forward solvers
    # (the slow-layer sweep left out: minutes of plain iteration).
    section deq_backward 240 python3 benchmarks/deq_backward.py --skip-slow
    # K=10, N=16 and 128, both systems, against evosax; CPU and GPU side by side.
    section pes_overhead 150 python3 benchmarks/pes_overhead.py --quick
fi
