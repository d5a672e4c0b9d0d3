#!/usr/bin/env bash
# Installs everything the real-kernel test lane (tests/vm/run.py) needs. Idempotent; when all is
# in place it only checks, in well under a second, and prints nothing but one "ready" line.
#
#   tests/vm/install.sh [VENV]          (VENV defaults to <repo>/.venv, which `make venv` creates)
#
# What it installs:
#   - Debian packages: QEMU (TCG is enough), a static busybox for virtme-ng's initramfs, kmod
#     (depmod, modprobe), and the user-space tools the VM tests drive: NFS server and rpcbind,
#     iproute2 (netns/veth), qemu-utils (qemu-img, qemu-nbd), nbd-client.
#   - virtme-ng, pinned, into the project venv.
#   - The kernel: the package `linux-image-amd64` currently points at, *unpacked* (not installed)
#     into $FLEXBLOCK_VM_CACHE/<kver>/ with its modules and a fresh modules.dep. Installing it
#     on the host would run initramfs-tools and kernel hooks and write /boot and /lib/modules for
#     a kernel the host never boots. virtme-ng finds the modules itself: given
#     <cache>/<kver>/boot/vmlinuz-<kver> it walks up to <cache>/<kver>/lib/modules/<kver>,
#     puts the drivers it needs to mount the root into its initramfs, and links that directory
#     to /lib/modules/<kver> inside the guest, so plain `modprobe` works there.
#     The cache lives outside the work tree (kept across sessions and fresh CI clones) and not
#     under /var/cache, which virtme-ng hides behind a tmpfs in the guest.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${1:-$REPO/.venv}
CACHE=${FLEXBLOCK_VM_CACHE:-/var/lib/flexblock-vm}
VIRTME_NG_VERSION=1.42
PACKAGES=(qemu-system-x86 busybox-static kmod udev file binutils e2fsprogs util-linux
          nfs-kernel-server rpcbind iproute2 qemu-utils nbd-client)

log() { echo "vm-install: $*" >&2; }
die() { echo "vm-install: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, and the lane drives kernel devices)"
[ "$(uname -m)" = x86_64 ] || die "the lane boots Debian's amd64 kernel; this is $(uname -m)"

apt_updated=0
apt_update_once() {
    if [ $apt_updated = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

# -- Debian packages ----------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' ||
        missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # An old or absent package list makes apt-get install fail; refresh once and retry.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null 2>&1; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    # nfs-kernel-server and rpcbind start their services where an init system runs; the host
    # needs neither (they are started inside the VM by the tests that need them).
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after install"

# -- virtme-ng in the venv ----------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || die "no venv at $VENV (run \`make venv\` first)"
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("virtme-ng"))' \
       2>/dev/null || true)
if [ "$have" != "$VIRTME_NG_VERSION" ]; then
    log "pip install virtme-ng==$VIRTME_NG_VERSION into $VENV"
    "$VENV/bin/python" -m pip install -q "virtme-ng==$VIRTME_NG_VERSION"
fi
[ -x "$VENV/bin/vng" ] || die "$VENV/bin/vng missing after install"

# -- the kernel ---------------------------------------------------------------------------------
# The image package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64 (the candidate
# version, read from the local package lists: no network unless the lists lack it).
kernel_package() {
    apt-cache show --no-all-versions linux-image-amd64 2>/dev/null \
        | sed -n 's/^Depends: *\(linux-image-[^ ,]*\).*/\1/p' | head -n1
}
pkg=$(kernel_package)
if [ -z "$pkg" ]; then
    apt_update_once
    pkg=$(kernel_package)
fi
[ -n "$pkg" ] || die "apt knows no linux-image-amd64"
kver=${pkg#linux-image-}
kver=${kver%-unsigned}
dest=$CACHE/$kver
if [ ! -f "$dest/.complete" ]; then
    log "unpacking $pkg into $dest"
    mkdir -p "$CACHE"
    work=$(mktemp -d "$CACHE/.unpack.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # apt-get download drops privileges to _apt: give it a directory it may write.
    chmod 0777 "$work"
    if ! (cd "$work" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
        apt_update_once
        (cd "$work" && apt-get download -qq "$pkg" >/dev/null)
    fi
    deb=$(ls "$work"/*.deb)
    dpkg-deb -x "$deb" "$work/root"
    rm -f "$deb"
    # bookworm ships modules in /lib/modules, trixie and later in /usr/lib/modules.
    for d in lib usr/lib; do
        if [ -d "$work/root/$d/modules/$kver" ]; then moddir=$work/root/$d/modules/$kver; fi
    done
    [ -n "${moddir:-}" ] || die "$pkg has no modules directory for $kver"
    [ -f "$work/root/boot/vmlinuz-$kver" ] || die "$pkg has no /boot/vmlinuz-$kver"
    depmod -a -b "${moddir%/lib/modules/$kver}" "$kver"
    [ -s "$moddir/modules.dep" ] || die "depmod made no modules.dep for $kver"
    rm -rf "$dest"
    mv "$work/root" "$dest"
    echo "$pkg" > "$dest/.complete"
    rm -rf "$work"
    trap - EXIT
    # Older kernels unpacked before are of no further use.
    for old in "$CACHE"/*/; do
        [ "${old%/}" = "$dest" ] || { log "removing old kernel ${old%/}"; rm -rf "${old%/}"; }
    done
fi
log "ready: kernel $kver, virtme-ng $VIRTME_NG_VERSION, $(qemu-system-x86_64 --version | head -n1)"
