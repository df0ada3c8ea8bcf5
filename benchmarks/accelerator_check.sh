#!/usr/bin/env bash
# One command that checks norm_optax on whatever accelerator this machine has:
#
#     bash benchmarks/accelerator_check.sh
#
# 1. makes a virtual environment with the test extra and the JAX build for
#    the hardware found: jax[cuda12] where nvidia-smi runs, jax[tpu] on a TPU
#    VM, nothing more on CPU (the same jax version as the test extra got);
# 2. checks that jax.default_backend() is that accelerator;
# 3. runs the test suite there (time-limited);
# 4. runs `python benchmarks/bench.py --quick` there (time-limited);
# 5. writes benchmarks/results/<device>.md: the device, the test outcome and
#    the benchmark tables (plots beside it), e.g. nvidia-h100.md, tpu-v5-lite.md,
#    cpu-intel-xeon-2core.md.
#
# The whole check stays under 8 minutes: it has a budget (ACCEL_BUDGET, 470 s
# from the start), and after the installs (1-3 minutes from PyPI, seconds when
# the venv is reused) the tests and the bench get time limits that fit in
# what is left, the bench keeping at least 2 minutes. The report is written
# even when a step fails or runs out of time (it says so); the exit status is
# then non-zero.
#
# Settings (environment variables):
#   ACCEL_VENV           virtual environment to create or reuse
#                        (default: $TMPDIR/norm_optax-accel-venv)
#   ACCEL_JAX_EXTRA      auto (default), cuda12, cuda13, tpu or none
#   ACCEL_BUDGET         seconds for the whole check (default 470)
#   ACCEL_TESTS          pytest arguments (default: none, the default suite
#                        of pyproject.toml); e.g. "tests/test_norms.py -x"
#   ACCEL_TEST_TIMEOUT   most seconds for the tests (default 240)
#   ACCEL_BENCH          1 (default) runs the benchmark, 0 skips it
#   ACCEL_BENCH_ARGS     arguments of bench.py (default --quick; --smoke for a
#                        run that only checks the script)
#   ACCEL_BENCH_TIMEOUT  most seconds for the benchmark (default 200)
#   ACCEL_OUT            folder of the report (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
VENV=${ACCEL_VENV:-${TMPDIR:-/tmp}/norm_optax-accel-venv}
EXTRA=${ACCEL_JAX_EXTRA:-auto}
BUDGET=${ACCEL_BUDGET:-470}
TEST_TIMEOUT=${ACCEL_TEST_TIMEOUT:-240}
BENCH=${ACCEL_BENCH:-1}
BENCH_ARGS=${ACCEL_BENCH_ARGS:---quick}
BENCH_TIMEOUT=${ACCEL_BENCH_TIMEOUT:-200}
OUT=${ACCEL_OUT:-$ROOT/benchmarks/results}
read -ra TEST_ARGS <<<"${ACCEL_TESTS:-}"
read -ra BENCH_ARGV <<<"$BENCH_ARGS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# Several pytest workers share one GPU: allocate on demand, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
say() { printf '\n=== %s (%ss)\n' "$1" "$(($(date +%s) - START))"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# min(wanted, what is left of the budget less a reserve), at least 30 s.
limit() {
  local n=$(($(left) - $2))
  [ "$n" -gt "$1" ] && n=$1
  [ "$n" -lt 30 ] && n=30
  echo "$n"
}

say "environment: $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install -q -e ".[test]"

if [ "$EXTRA" = auto ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA=cuda12
  elif [ -e /dev/accel0 ] || [ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_NAME:-}" ]; then
    EXTRA=tpu
  else
    EXTRA=none
  fi
fi
JAX_VERSION=$("$PY" -c "import jax; print(jax.__version__)")
if [ "$EXTRA" != none ]; then
  say "installing jax[$EXTRA]==$JAX_VERSION"
  "$PY" -m pip install -q "jax[$EXTRA]==$JAX_VERSION"
fi
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())")
case "$EXTRA:$BACKEND" in
  none:cpu | cuda*:gpu | tpu:tpu) ;;
  *)
    echo "jax[$EXTRA] is installed but jax.default_backend() is $BACKEND" >&2
    exit 1
    ;;
esac
if [ "$BACKEND" = tpu ]; then
  TEST_ARGS+=(-n 0) # one process owns a TPU: no pytest-xdist workers
fi
DEVICE=$("$PY" - <<'EOF'
import re
import sys

import jax

sys.path.insert(0, "benchmarks")
import _harness

devices = jax.devices()
if jax.default_backend() == "cpu":
    print("cpu-" + _harness.machine_slug())
else:
    slug = re.sub(r"[^a-z0-9]+", "-", devices[0].device_kind.lower()).strip("-")
    print(slug if len(devices) == 1 else f"{len(devices)}x-{slug}")
EOF
)
say "backend $BACKEND, device $DEVICE"

RESERVE=15 # for the report
[ "$BENCH" = 1 ] && RESERVE=135
TEST_TIMEOUT=$(limit "$TEST_TIMEOUT" "$RESERVE")
say "tests: python -m pytest ${TEST_ARGS[*]:-} (limit ${TEST_TIMEOUT}s)"
TEST_START=$(date +%s)
set +e
timeout --kill-after=10 "$TEST_TIMEOUT" "$PY" -m pytest -p no:cacheprovider \
  "${TEST_ARGS[@]}" 2>&1 | tee "$LOGS/tests.log"
TEST_RC=${PIPESTATUS[0]}
set -e
TEST_SECONDS=$(($(date +%s) - TEST_START))

mkdir -p "$OUT"
REPORT=$OUT/$DEVICE.md
rm -f "$REPORT"
BENCH_RC=skipped
BENCH_SECONDS=0
if [ "$BENCH" = 1 ]; then
  BENCH_TIMEOUT=$(limit "$BENCH_TIMEOUT" 15)
  say "bench: python benchmarks/bench.py ${BENCH_ARGV[*]} (limit ${BENCH_TIMEOUT}s)"
  BENCH_START=$(date +%s)
  set +e
  timeout --kill-after=10 "$BENCH_TIMEOUT" "$PY" benchmarks/bench.py \
    "${BENCH_ARGV[@]}" --out "$REPORT" 2>&1 | tee "$LOGS/bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  set -e
  BENCH_SECONDS=$(($(date +%s) - BENCH_START))
fi

say "report: $REPORT"
export REPORT DEVICE BACKEND EXTRA TEST_RC TEST_SECONDS TEST_TIMEOUT BENCH_RC \
  BENCH_SECONDS BENCH_TIMEOUT START LOGS
export TEST_COMMAND="python -m pytest ${TEST_ARGS[*]:-}"
export BENCH_COMMAND="python benchmarks/bench.py ${BENCH_ARGV[*]}"
"$PY" - <<'EOF'
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jaxlib
import optax

sys.path.insert(0, "benchmarks")
import _harness

env = os.environ
report = Path(env["REPORT"])
bench = report.read_text() if report.exists() else ""
devices = jax.devices()


def outcome(rc: str, seconds: str, limit: str) -> str:
    if rc == "skipped":
        return "skipped (ACCEL_BENCH=0)"
    if rc in ("124", "137"):
        return f"**ran out of time** after {seconds} s (limit {limit} s)"
    return f"exit status {rc}, {seconds} s (limit {limit} s)"


log = (Path(env["LOGS"]) / "tests.log").read_text(errors="replace")
summary = [line.strip("= ") for line in log.splitlines() if re.search(
    r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran", line)
    and " in " in line]
failures = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))]
gpu = ""
if env["BACKEND"] == "gpu":
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"]
    gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip()

lines = [
    f"# Accelerator check: {env['DEVICE']} ({env['BACKEND']} backend)",
    "",
    "Written by `benchmarks/accelerator_check.sh`: the test suite and the quick "
    "benchmark, run on the accelerator that `jax.default_backend()` found.",
    "",
    "| | |",
    "|---|---|",
    f"| backend | {env['BACKEND']} |",
    f"| devices | {len(devices)} x {devices[0].device_kind} |",
    f"| jax extra installed | {env['EXTRA']} |",
    f"| jax / jaxlib / optax | {jax.__version__} / {jaxlib.__version__} / "
    f"{optax.__version__} |",
]
if gpu:
    lines.append(f"| nvidia-smi (name, driver, memory) | {gpu} |")
lines += [
    f"| host | {_harness.machine_slug()}, python {platform.python_version()} |",
    f"| date (UTC) | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} |",
    f"| wall time of the check | {int(time.time()) - int(env['START'])} s |",
    "",
    "## Tests",
    "",
    f"`{env['TEST_COMMAND'].strip()}`: "
    + outcome(env["TEST_RC"], env["TEST_SECONDS"], env["TEST_TIMEOUT"])
    + (f"; **{summary[-1]}**." if summary else "; no pytest summary line."),
    "",
]
if failures:
    lines += ["```text", *failures[:50], "```", ""]
lines += [
    "## Benchmark",
    "",
    f"`{env['BENCH_COMMAND']}`: "
    + outcome(env["BENCH_RC"], env["BENCH_SECONDS"], env["BENCH_TIMEOUT"])
    + ".",
    "",
]
if bench:  # bench.py's own report, one heading level down
    lines.append(re.sub(r"^#", "##", bench, flags=re.M))
report.write_text("\n".join(lines).rstrip() + "\n")
print(report.read_text().split("## Benchmark")[0])
EOF

say "done: $REPORT"
[ "$TEST_RC" = 0 ] && { [ "$BENCH_RC" = 0 ] || [ "$BENCH_RC" = skipped ]; }
