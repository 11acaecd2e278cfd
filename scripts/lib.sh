# Sourced by the scripts (from the repository root).

# release_dir: the absolute path of cargo's release binaries. Cargo decides where its target
# directory is (CARGO_TARGET_DIR, a target-dir in .cargo/config.toml, else ./target), so ask it
# rather than assume ./target.
release_dir() {
    local dir
    dir=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    if [[ -z "$dir" ]]; then
        echo "cannot learn cargo's target directory (cargo metadata)" >&2
        return 1
    fi
    echo "$dir/release"
}

# skip REASON: a test script that cannot run here. Under CI (any non-empty CI) that fails;
# elsewhere it fails too unless ALLOW_SKIP=1, which makes it a skip recorded in SKIP_LOG (make
# test lists the skips at the end). SCRIPT_NAME names the script in the messages.
skip() {
    local name=${SCRIPT_NAME:-test}
    if [[ -n "${CI:-}" ]]; then
        echo "$name: FAIL: $1 (under CI nothing may skip)" >&2
        exit 1
    fi
    if [[ "${ALLOW_SKIP:-}" != "1" ]]; then
        echo "$name: FAIL: $1 (install what is missing, or set ALLOW_SKIP=1 to skip)" >&2
        exit 1
    fi
    echo "$name: SKIP: $1"
    [[ -n "${SKIP_LOG:-}" ]] && echo "$name (make e2e): $1" >> "$SKIP_LOG"
    exit 0
}

# wait_for DESCRIPTION COMMAND...: poll COMMAND up to 20 s.
wait_for() {
    local what=$1; shift
    for _ in $(seq 200); do "$@" && return 0; sleep 0.1; done
    echo "${SCRIPT_NAME:-test}: timed out waiting for $what" >&2
    return 1
}
