"""ext2/3/4 online growth in the real-kernel lane: resize2fs needs CAP_SYS_RESOURCE, which the
host sandbox withholds (there those cases skip), and the lane's guest has."""

import pytest

from kubelet import MiB, kubelet, new_volume, share  # noqa: F401
from test_flexvolume_expand import grow_and_check
from test_flexvolume_kill import expandfs_killed_then_retried
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]


@pytest.mark.parametrize("with_file", [True, False], ids=["spec", "after-restart"])
def test_ext4_online_expandfs(kubelet, share, with_file):
    old = 64 * MiB
    user = new_volume(share, size="64Mi") if with_file else {}
    grow_and_check(kubelet, share, "ext4", user, old=old, new=2 * old)


# The steps that differ for ext4 (resize2fs killed; device grown, filesystem not); the others
# are the same for every filesystem and run on the host with xfs.
@pytest.mark.parametrize("fault", ["grow-device", "tool"])
def test_ext4_expandfs_killed_at_each_step_then_retried(kubelet, share, tmp_path, fault):
    expandfs_killed_then_retried(kubelet, share, tmp_path, "ext4", fault)
