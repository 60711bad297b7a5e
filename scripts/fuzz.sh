#!/usr/bin/env bash
# Fuzzes llm-ratelimit's input parsers with cargo-fuzz (libFuzzer, nightly); see
# docs/fuzzing.md for the targets and what each asserts.
#
#   scripts/fuzz.sh --ci             build every target, run each briefly (FUZZ_SECONDS, 15)
#   scripts/fuzz.sh --long [SECS]    run each target SECS seconds (default 600), with a table
#   scripts/fuzz.sh TARGET [ARGS]    run one target until stopped; ARGS go to libFuzzer
#
# Every mode fails on a crash and leaves the input in fuzz/artifacts/<target>/. The checked-in
# seeds in fuzz/corpus/<target>/ are read, never written: what a run discovers goes to
# fuzz/target/corpus/<target>/ (gitignored), which later runs resume from.
#
# The script lowers its own priority (nice 19): on a shared machine the build and the runs
# take only idle CPU. Installs the nightly toolchain and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
renice -n 19 -p $$ >/dev/null

# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_nightly
need_cargo_tool cargo-fuzz cargo-fuzz

TARGETS=(understand path output_meter config handle)
# One build for every mode, so --ci and --long share fuzz/target. No sanitizer: the code
# under test is safe Rust (ASan would mostly cost speed), and debug assertions with
# overflow checks stay on. 16 codegen units rather than cargo-fuzz's default of one: the
# dependency tree (tonic, envoy-types, redis) is large and the build is most of the cost.
BUILD_FLAGS=(--sanitizer "${FUZZ_SANITIZER:-none}" --codegen-units 16)

dict_for() {
  case "$1" in
    understand | output_meter) echo "-dict=fuzz/dict/json.dict" ;;
    config) echo "-dict=fuzz/dict/yaml.dict" ;;
  esac
}

# run_target TARGET LIBFUZZER_ARGS... — one bounded run; its log in fuzz/target/logs/.
run_target() {
  local target=$1
  shift
  local work="fuzz/target/corpus/$target" log="fuzz/target/logs/$target.log"
  mkdir -p "$work" "fuzz/artifacts/$target" "$(dirname "$log")"
  local dict
  dict=$(dict_for "$target")
  # -timeout: an input that takes 60 s is a hang, reported like a crash. Inputs take
  # milliseconds, but a process's first one also builds the tokenizer (~1 s of CPU), which
  # at nice 19 on a busy machine was seen to take 10 s of wall time.
  cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "$target" "$work" "fuzz/corpus/$target" -- \
    -timeout=60 -max_len=16384 -print_final_stats=1 ${dict:+"$dict"} "$@" >"$log" 2>&1
}

# runs_of TARGET — executions of the last run, from libFuzzer's final stats.
runs_of() {
  awk '/^stat::number_of_executed_units:/ { n = $NF } END { print n + 0 }' \
    "fuzz/target/logs/$1.log"
}

# bounded SECONDS — every target for SECONDS each; a table, then a cargo-style result line.
bounded() {
  local seconds=$1 passed=0 failed=0 target started took runs total=0
  printf '%-14s %12s %8s %10s  %s\n' target executions seconds "exec/s" result
  for target in "${TARGETS[@]}"; do
    started=$SECONDS
    if run_target "$target" -max_total_time="$seconds"; then
      result=ok
      passed=$((passed + 1))
    else
      result="FAILED (fuzz/target/logs/$target.log, fuzz/artifacts/$target/)"
      failed=$((failed + 1))
    fi
    took=$((SECONDS - started))
    runs=$(runs_of "$target")
    total=$((total + runs))
    printf '%-14s %12d %8d %10d  %s\n' "$target" "$runs" "$took" $((runs / (took > 0 ? took : 1))) "$result"
  done
  echo "all targets: $total executions"
  # Same shape as cargo's summary, so scripts/test.sh counts the targets in its total.
  if ((failed)); then
    echo "test result: FAILED. $passed passed; $failed failed (fuzz)"
    for target in "${TARGETS[@]}"; do
      grep -m1 -A12 -E '^(thread .* panicked|==[0-9]+== ERROR|ALARM|SUMMARY)' \
        "fuzz/target/logs/$target.log" || true
    done
    return 1
  fi
  echo "test result: ok. $passed passed; 0 failed (fuzz)"
}

build() {
  echo "== cargo fuzz build (${BUILD_FLAGS[*]})"
  local started=$SECONDS
  cargo +nightly fuzz build "${BUILD_FLAGS[@]}"
  echo "built in $((SECONDS - started)) s"
}

case "${1:-}" in
  --ci)
    build
    bounded "${FUZZ_SECONDS:-15}"
    ;;
  --long)
    build
    bounded "${2:-600}"
    ;;
  "" | -h | --help)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    target=$1
    shift
    dict=$(dict_for "$target")
    mkdir -p "fuzz/target/corpus/$target"
    exec cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "$target" \
      "fuzz/target/corpus/$target" "fuzz/corpus/$target" -- -max_len=16384 ${dict:+"$dict"} "$@"
    ;;
esac
