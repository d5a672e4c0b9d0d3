#!/bin/sh
# First thing the VM runs once booted (tests/vm/run.py starts it with `vng --exec`). Its first
# line of output marks the end of the boot for the host, which times it; then guest.py takes over.
echo "flexblock-vm: guest command started at uptime $(cut -d' ' -f1 /proc/uptime) s"

# Read-only 9p shares of the repository and Python, with the page cache on, mounted over their
# own paths before Python starts (see cached_exports in run.py). Without them all still works,
# only slower.
for export in $FLEXBLOCK_VM_CACHED; do
    tag=${export%%:*}
    path=${export#*:}
    mount -t 9p -o ro,version=9p2000.L,trans=virtio,access=any,msize=512000,cache=loose \
        "$tag" "$path" ||
        echo "flexblock-vm: warning: could not mount the cached share of $path; going on uncached"
done
cd "$PWD" || exit 3  # the working directory anew, through the mount just made
echo "flexblock-vm: cached shares mounted at uptime $(cut -d' ' -f1 /proc/uptime) s"

exec "$FLEXBLOCK_VM_PYTHON" "$(dirname "$0")/guest.py"
