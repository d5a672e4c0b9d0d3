#!/bin/bash
# Timing reference only: the commands the seed driver kvaps/loop runs for one mount and one
# unmount of an existing, formatted volume, as described in shared/reference/seed-drivers.md §1
# (five jq reads, mountpoint checks, blkid, mount -o loop; umount). Not a driver.
set -u
case "$1" in
mount)
  dir=$2 json=$3
  command -v jq >/dev/null || exit 1
  share=$(jq -r '.share' <<<"$json")
  file=$(jq -r '.file' <<<"$json")
  fstype=$(jq -r '."kubernetes.io/fsType"' <<<"$json")
  mmp=$(jq -r '.mmp' <<<"$json")
  size=$(jq -r '.size' <<<"$json")
  mountpoint -q "$share" || exit 1
  image="$share/$file"
  [ -f "$image" ] || exit 1
  mountpoint -q "$dir" && exit 0
  blkid -o udev "$image" | grep -q ID_FS_TYPE || exit 1
  mkdir -p "$dir"
  mount -o loop "$image" "$dir" || exit 1
  ;;
unmount)
  mountpoint -q "$2" || exit 0
  umount "$2" || exit 1
  ;;
esac
echo '{"status": "Success"}'
