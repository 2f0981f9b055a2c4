#!/usr/bin/env bash
# The test suite under every CPU code path this host offers and two thread counts:
# default (SSE4.2), avx2, and avx512 where the CPU has it, ATen, MKL and oneDNN capped together
# (scripts/cpu_isa.sh), each with 1 and 2 torch / MKL threads (OMP_NUM_THREADS). One log per
# variant in ${MATRIX_LOGS:-matrix-logs}/ and a summary table; exits non-zero if any variant
# fails. make test keeps one variant (avx2, one thread, in its second pass); this runs them
# all (about six times the suite's time).
#
# Each variant gets a torch.compile cache of its own (TORCHINDUCTOR_CACHE_DIR): a cache
# filled under one capability hands its vector code to another (under default it fails to
# compile: at::vec is not declared there).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/cpu_isa.sh
LOGS=${MATRIX_LOGS:-matrix-logs}
mkdir -p "$LOGS"
capabilities="default avx2"
grep -qw avx512f /proc/cpuinfo && capabilities="$capabilities avx512"
status=0
summary=""
for capability in $capabilities; do
  for threads in 1 2; do
    name="$capability-threads$threads"
    start=$(date +%s)
    rm -rf "$LOGS/inductor-$name"
    (use_cpu_isa "$capability" && export OMP_NUM_THREADS="$threads" TORCHINDUCTOR_CACHE_DIR="$LOGS/inductor-$name" &&
      bash scripts/run_tests.sh -p no:cacheprovider "$@") >"$LOGS/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    summary+="$(printf '%-20s exit %-3s %5ss  %s' "$name" "$rc" "$(( $(date +%s) - start ))" "$(tail -1 "$LOGS/$name.log")")"$'\n'
    echo "$name: exit $rc"
  done
done
printf '\n%s' "$summary"
exit "$status"
