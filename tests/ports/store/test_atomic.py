"""Atomic writes: whole file or nothing, no temporary file left, errors that name the path."""

import errno
import os

import pytest

from ports.store import atomic
from ports.store.atomic import StoreError


def fail_writes_under(monkeypatch, folder, code=errno.ENOSPC, after=7):
    """Make ``os.write`` to files under ``folder`` write ``after`` bytes and then fail with ``code``
    (a disk that fills up mid-file); writes elsewhere go through."""
    real_write = os.write

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(folder)):
            real_write(fd, bytes(data)[:after])
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_write_bytes_creates_and_replaces(tmp_path):
    path = tmp_path / "a.bin"
    atomic.write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic.write_bytes(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    atomic.write_text(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]


def test_large_write_is_complete(tmp_path):
    data = bytes(range(256)) * 40_000  # 10 MB: several os.write calls on some systems
    atomic.write_bytes(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_full_disk_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "label.png"
    atomic.write_bytes(path, b"old content")
    fail_writes_under(monkeypatch, tmp_path)
    with pytest.raises(StoreError) as caught:
        atomic.write_bytes(path, b"new content that does not fit")
    monkeypatch.undo()
    message = str(caught.value)
    assert str(path) in message
    assert "full" in message and "space" in message  # says what happened and what to do
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.path == path
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["label.png"]


def test_temp_names_are_recognised_and_map_back(tmp_path):
    temp = atomic.temp_name(tmp_path / "00000012.jpg")
    assert temp.parent == tmp_path
    assert atomic.is_temp(temp) and atomic.is_temp(temp.name)
    assert atomic.target_of_temp(temp.name) == "00000012.jpg"
    assert atomic.temp_name(tmp_path / "x") != atomic.temp_name(tmp_path / "x")
    for name in ("00000012.jpg", "manifest-00000.jsonl", ".hidden", "x.jaxmask-tmp"):
        assert not atomic.is_temp(name)


def test_folder_under_a_regular_file_is_a_clear_error(tmp_path):
    # Tests run as root, and root ignores a folder's mode bits (chmod 0o500 would not stop it):
    # a path whose parent is a regular file fails for every user (ENOTDIR).
    (tmp_path / "file.txt").write_text("not a folder")
    target = tmp_path / "file.txt" / "dataset"
    with pytest.raises(StoreError) as caught:
        atomic.make_folder(target)
    assert str(target) in str(caught.value) and "not a folder" in str(caught.value)
    with pytest.raises(StoreError) as caught:
        atomic.write_bytes(target / "a.jpg", b"x")
    assert str(target / "a.jpg") in str(caught.value)
    assert caught.value.errno == errno.ENOTDIR


def test_permission_denied_is_a_clear_error(tmp_path, monkeypatch):
    # Simulated: as root no real folder refuses a write without privileges we do not have.
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(StoreError) as caught:
        atomic.check_writable(tmp_path)
    monkeypatch.undo()
    assert str(tmp_path) in str(caught.value)
    assert "not writable" in str(caught.value) and "writable output folder" in str(caught.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores mode bits; see the ENOTDIR test")
def test_read_only_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            atomic.check_writable(folder)
    finally:
        folder.chmod(0o700)
