#!/usr/bin/env bash
# Installs the system packages the tests need. Run as root (CI is); elsewhere it says what is
# missing and leaves the choice to you (tests that need a missing tool skip, with a reason,
# unless CI=true).
set -euo pipefail
PKGS=(qemu-utils libnbd-bin nbdkit fio e2fsprogs xfsprogs fuse3 util-linux nbd-client gnutls-bin)
need=()
for tool in qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin \
            nbdkit:nbdkit fio:fio mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs fusermount3:fuse3 losetup:util-linux \
            nbd-client:nbd-client certtool:gnutls-bin; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "install-deps: every tool is present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages ${need[*]}; run as root to install them (tests that need them will skip)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${PKGS[@]}" >/dev/null
echo "install-deps: installed ${PKGS[*]}"
