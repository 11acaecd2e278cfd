#!/usr/bin/env bash
# make deps: installs what the tests and benchmarks run besides cargo: the system tools (as
# root, with apt-get), and rustfmt and clippy (with rustup, when rustup manages the toolchain).
# Only `make deps` and .ci/run call this; `make test` never installs anything.
# Not root: lists what is missing and exits 0 (make test then skips, and lists, the tests that
# need it), or 1 under CI (any non-empty CI), where nothing may be missing.
set -euo pipefail

# tool:packages for every tool the build, a test, e2e or a benchmark runs (Debian / Ubuntu
# names; cc builds mimalloc's and ring's C code; chromium renders `crashmonkey report`'s page in
# crashmonkey/tests/report_browser.rs; sqlite3 is the application e2e runs `crashmonkey run` on).
TOOLS=(make:make cc:gcc,libc6-dev qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin
       nbdfuse:libnbd-bin nbdkit:nbdkit fio:fio mkfs.ext4:e2fsprogs e2fsck:e2fsprogs
       mkfs.xfs:xfsprogs xfs_repair:xfsprogs fusermount3:fuse3 losetup:mount mount:mount
       modprobe:kmod nbd-client:nbd-client certtool:gnutls-bin python3:python3
       xfs_io:xfsprogs setfattr:attr getfattr:attr mkfs.btrfs:btrfs-progs btrfs:btrfs-progs
       chromium:chromium sqlite3:sqlite3)

need=()
if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo fmt --version >/dev/null 2>&1 || need+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || need+=(clippy)
if [ ${#need[@]} -gt 0 ]; then
    # rustup failed, or the toolchain is not rustup's: apt-get cannot help with these.
    echo "install-deps: cargo has no ${need[*]} (rustup component add rustfmt clippy)"
    [ -z "${CI:-}" ] || exit 1
fi
need=()
for t in "${TOOLS[@]}"; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "install-deps: every tool is present"
    exit 0
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | tr , '\n' | sort -u)
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${need[*]}; run make deps as root to install them"
    [ -z "${CI:-}" ] || exit 1
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
echo "install-deps: installed ${need[*]}"
