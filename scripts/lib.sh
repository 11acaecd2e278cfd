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
