"""get(), find() and list_devices(): handles for devices that are already bound."""

import os
from pathlib import Path

import pytest

import loopctl

from helpers import MiB, bound_to, losetup_associated, losetup_row


def identity(dev: loopctl.LoopDevice) -> tuple:
    return (dev.number, dev.path, dev.devno, dev.diskseq, dev.backing_file, dev.backing_devno,
            dev.backing_inode, dev.offset, dev.sizelimit)


@pytest.fixture
def attached(image):
    img = image(8 * MiB)
    with loopctl.attach(img, offset=4096, sizelimit=4 * MiB, ref="discovery") as dev:
        yield dev


@pytest.mark.parametrize("form", ["number", "name", "path", "pathlike"])
def test_get_finds_the_same_binding_in_every_form(attached, form):
    device = {"number": attached.number, "name": attached.name, "path": attached.path,
              "pathlike": Path(attached.path)}[form]
    found = loopctl.get(device)
    assert identity(found) == identity(attached)
    assert found.info() == attached.info()


def test_a_handle_from_get_holds_no_fd(attached):
    found = loopctl.get(attached.number)
    with pytest.raises(ValueError):
        found.fileno()


def test_leaving_a_handle_from_get_does_not_detach(attached):
    with loopctl.get(attached.path):
        pass
    assert bound_to(attached.info().backing_file) == {attached.number}


def test_find_matches_by_file_and_offset(image):
    img = image(8 * MiB)
    with loopctl.attach(img) as whole, loopctl.attach(img, offset=1 * MiB) as tail:
        assert sorted(d.number for d in loopctl.find(img)) == sorted([whole.number, tail.number])
        assert [d.number for d in loopctl.find(img, offset=0)] == [whole.number]
        assert [d.number for d in loopctl.find(img, offset=1 * MiB)] == [tail.number]
        assert loopctl.find(img, offset=2 * MiB) == []
        assert {d.number for d in loopctl.find(img)} == losetup_associated(img)


def test_find_returns_handles_like_get(attached):
    [found] = loopctl.find(attached.info().backing_file)
    assert identity(found) == identity(attached)


def test_find_by_relative_path_and_symlink(image, tmp_path, monkeypatch):
    img = image(4 * MiB, name="target.img")
    (tmp_path / "link.img").symlink_to(img)
    with loopctl.attach(img) as dev:
        monkeypatch.chdir(tmp_path)
        assert [d.number for d in loopctl.find("target.img")] == [dev.number]
        assert [d.number for d in loopctl.find(tmp_path / "link.img")] == [dev.number]


def test_find_of_a_file_with_no_device_is_empty(image):
    assert loopctl.find(image(1 * MiB)) == []


def test_find_of_a_deleted_backing_file(image):
    img = image(4 * MiB)
    with loopctl.attach(img) as dev:
        os.unlink(img)
        assert dev.backing_file == f"{img} (deleted)"
        assert losetup_row(dev.path)["back-file"] == f"{img} (deleted)"
        assert [d.number for d in loopctl.find(img)] == [dev.number]
        assert [d.number for d in loopctl.find(img, offset=0)] == [dev.number]
        assert loopctl.find(img, offset=512) == []


def test_find_does_not_confuse_a_new_file_with_a_deleted_one_at_the_same_path(image):
    img = image(4 * MiB, name="reused.img")
    with loopctl.attach(img) as old:
        os.unlink(img)
        image(4 * MiB, name="reused.img")
        assert loopctl.find(img) == []
        with loopctl.attach(img) as new:
            assert [d.number for d in loopctl.find(img)] == [new.number]
            assert new.number != old.number


def test_list_devices_includes_ours_as_they_are(image):
    img_a, img_b = image(4 * MiB), image(8 * MiB)
    with loopctl.attach(img_a) as a, loopctl.attach(img_b, read_only=True) as b:
        listed = {d.number: d for d in loopctl.list_devices()}
        assert identity(listed[a.number]) == identity(a)
        assert identity(listed[b.number]) == identity(b)
        assert listed[b.number].read_only
        with pytest.raises(ValueError):
            listed[a.number].fileno()


def test_a_stale_handle_refuses_to_act_after_its_device_was_detached(attached):
    found = loopctl.get(attached.number)
    attached.detach(wait=True)
    with pytest.raises(loopctl.NotBound):
        found.info()
    with pytest.raises(loopctl.NotBound):
        found.detach()
    with pytest.raises(loopctl.NotBound):
        found.resize()


def test_a_stale_handle_leaves_a_new_binding_of_the_same_device_alone(image):
    # Re-binding may land on another number if something else allocates meanwhile; the
    # handle must refuse either way, and never detach what is bound now.
    first = loopctl.attach(image(4 * MiB))
    stale = loopctl.get(first.number)
    first.detach(wait=True)
    with loopctl.attach(image(4 * MiB)) as second:
        with pytest.raises(loopctl.NotBound):
            stale.detach()
        assert second.info().backing_file is not None
        assert loopctl.get(second.number).diskseq == second.diskseq
