"""Data paths: a store is owned by one server at a time, and raw block devices work as data paths
(loop devices stand in for NVMe here) without ever overwriting what another owner keeps on them."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, MemkvServer, loop_device
from memkv_nixl import Status

MiB = 1 << 20


def _serve(*args, timeout=60):
    """`memkv serve` that is expected to refuse to start: its exit code and output."""
    r = subprocess.run([sys.executable, "-m", "memkv_nixl.cli", "serve", "--listen", "127.0.0.1:0",
                        "--listen-unix", "off", "--ram-cache", "0", *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return r.returncode, r.stdout + r.stderr


def _get(c, keys, size):
    bufs = [bytearray(size) for _ in keys]
    return c.get(keys, bufs), [bytes(b) for b in bufs]


def test_a_second_server_on_the_same_data_is_refused_and_the_first_loses_nothing(memkv_server):
    """Two servers on one store would each rewrite the journal: the second is refused before it
    touches anything, and every block the first acknowledges stays durable through kill -9."""
    s = memkv_server()
    keys = [f"k/{i}".encode() for i in range(40)]
    data = [os.urandom(64 << 10) for _ in keys]
    with s.client() as c:
        assert c.put(keys[:20], data[:20]) == [Status.OK] * 20
        code, out = _serve("--data", str(s.data), "--capacity", str(s.capacity))
        assert code == 2, out
        assert "in use by another memkv server" in out and str(s.data) in out, out
        assert c.put(keys[20:], data[20:]) == [Status.OK] * 20
    s.kill9()
    s.start()
    with s.client() as c:
        assert _get(c, keys, 64 << 10) == ([Status.OK] * 40, data)


def test_a_raw_block_device_is_a_data_path_sized_from_the_device(tmp_path):
    """--data /dev/loopN with no --capacity: the whole device is the ring. Sync puts of several
    sizes come back equal after kill -9, and filling it twice over evicts instead of failing."""
    with loop_device(tmp_path / "disk.img", 96 * MiB) as dev:
        s = MemkvServer(tmp_path, "dev", capacity=0, data=dev,
                        extra=["--meta-dir", str(tmp_path / "meta"), "--max-block", "4MiB"])
        try:
            with s.client() as c:
                st = c.stats()[s.address]
                assert st["data_paths"] == [dev]
                assert st["capacity_bytes"] == 96 * MiB - 4096  # the device, less its superblock
                sizes = [4096, 64 << 10, MiB, 4 * MiB]
                keys = [f"dev/{n}/{i}".encode() for n in sizes for i in range(3)]
                data = [os.urandom(n) for n in sizes for _ in range(3)]
                assert c.put(keys, data) == [Status.OK] * len(keys)
            s.kill9()
            s.start()
            with s.client() as c:
                for k, d in zip(keys, data):
                    assert _get(c, [k], len(d)) == ([Status.OK], [d])
                fill = [f"fill/{i}".encode() for i in range(48)]  # 192 MiB into a 96 MiB device
                blob = os.urandom(4 * MiB)
                for i in range(0, 48, 8):
                    assert c.put(fill[i:i + 8], [blob] * 8) == [Status.OK] * 8
                st = c.stats()[s.address]
                assert st["used_bytes"] <= st["capacity_bytes"]
                assert st["namespaces"]["test"]["evictions"] > 0
                assert _get(c, fill[-4:], 4 * MiB) == ([Status.OK] * 4, [blob] * 4)
        finally:
            s.kill9()


def test_a_block_device_holding_a_filesystem_is_refused_and_left_untouched(tmp_path):
    """A device with a filesystem on it (the wrong /dev name in a config) is never overwritten;
    mounted, it is refused as in use. Zeroing its start is the owner's consent."""
    with loop_device(tmp_path / "disk.img", 64 * MiB) as dev:
        made = subprocess.run(["mkfs.ext4", "-q", dev], capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"mkfs.ext4 failed here: {made.stderr.strip()}")
        with open(dev, "rb") as f:
            before = f.read(1 << 20)
        args = ("--data", dev, "--meta-dir", str(tmp_path / "meta"))
        code, out = _serve(*args)
        assert code == 2, out
        assert f"block device {dev} holds an ext2/3/4 filesystem" in out and "wipefs" in out, out
        with open(dev, "rb") as f:
            assert f.read(1 << 20) == before
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        if subprocess.run(["mount", dev, str(mnt)], capture_output=True).returncode == 0:
            try:
                code, out = _serve(*args)
                assert code == 2 and f"block device {dev} is in use" in out, out
            finally:
                subprocess.run(["umount", str(mnt)], capture_output=True)
        with open(dev, "r+b") as f:
            f.write(bytes(1 << 20))  # the owner's consent
        s = MemkvServer(tmp_path, "dev", capacity=0, data=dev, extra=[*args[2:], "--max-block", "4MiB"])
        try:
            with s.client() as c:
                assert c.put([b"k"], [b"v" * 4096]) == [Status.OK]
        finally:
            s.kill9()
