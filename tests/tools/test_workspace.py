"""Workspaces: safe names for any session id, seeding from a directory or an archive (refusing
archives that point outside), and removal, also of the roots of processes that were killed."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools_helpers import needs_bwrap, tool_runtime

from mars.tools.workspace import ROOT_PREFIX, Workspaces, dir_name


@pytest.fixture()
def root(tmp_path: Path) -> Iterator[Path]:
    """A workspace root that session uids can reach (pytest's tmp_path is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="mars-test-"))
    top.chmod(0o711)
    yield top / "root"
    shutil.rmtree(top)


@pytest.mark.parametrize(
    "session_id", ["..", ".", "../../etc", "/abs/path", "a/b", "é\0\n", "x" * 500]
)
def test_any_session_id_is_one_safe_directory_under_the_root(session_id: str, root: Path) -> None:
    spaces = Workspaces(root)
    ws = spaces.open(session_id)
    assert ws.path.parent == spaces.root and ws.path.is_dir()
    assert len(ws.path.name) <= 61 and "/" not in ws.path.name
    assert dir_name("a/b") != dir_name("a_b")  # sanitizing never merges two ids
    spaces.close()
    assert spaces.root.is_dir() and not ws.path.exists()  # a given root is kept


KILLED = (
    "import os, signal; from mars.tools.workspace import Workspaces; "
    "print(Workspaces().root, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
)


def test_the_temporary_root_of_a_killed_process_goes_at_the_next_start(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = root.parent
    monkeypatch.setattr(tempfile, "tempdir", str(parent))
    live = Workspaces()
    env = {**os.environ, "TMPDIR": str(parent)}
    killed = subprocess.run([sys.executable, "-c", KILLED], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead = Path(killed.stdout.strip())
    assert dead.parent == parent and dead.is_dir()
    half_made = parent / f"{ROOT_PREFIX}half-made"  # no owner file yet (or an older mars's root)
    half_made.mkdir()
    spaces = Workspaces()
    assert not dead.exists()
    assert live.root.is_dir() and half_made.is_dir()  # its process lives; unknown: not ours
    spaces.close()
    live.close()
    assert not live.root.exists() and not spaces.root.exists()


def make_tree(top: Path) -> Path:
    (top / "pkg").mkdir(parents=True)
    (top / "pkg" / "mod.py").write_text("VALUE = 42\n")
    (top / "README").write_text("hello\n")
    (top / "link").symlink_to("/etc/hostname")
    os.mkfifo(top / "fifo")  # left out: opening it would block
    return top


@needs_bwrap
def test_seeding_from_a_directory_and_a_tar_gz(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = tmp_path / "seed.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree / "pkg", arcname="fromtar/pkg")

    async def scenario() -> None:
        async with tool_runtime() as rt:
            ws = await rt.seed("s", tree)
            await rt.seed("s", archive)
            r = await rt.run(
                "s", "cat README; python3 -c 'import pkg.mod as m; print(m.VALUE)'", 10
            )
            assert r.stdout == "hello\n42\n", r
            r = await rt.run("s", "cat fromtar/pkg/mod.py; ls fifo; readlink link", 10)
            assert "VALUE = 42" in r.stdout and "/etc/hostname" in r.stdout
            assert "fifo" in r.stderr  # not copied
            r = await rt.run("s", "cat link", 10)
            assert r.exit_code != 0  # the link's target is not in the sandbox
            if ws.uid is not None:
                owners = {p.lstat().st_uid for p in [ws.path, *ws.path.rglob("*")]}
                assert owners == {ws.uid}

    asyncio.run(scenario())


def _tar(path: Path, name: str, link: str | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(name)
        if link is None:
            info.size = 5
            tf.addfile(info, io.BytesIO(b"evil\n"))
        else:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tf.addfile(info)
    return path


def test_archives_that_reach_outside_are_refused(tmp_path: Path, root: Path) -> None:
    spaces = Workspaces(root)
    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("../zipped-out", "evil\n")
    bad = [
        _tar(tmp_path / "dotdot.tar", "../x"),
        _tar(tmp_path / "abs.tar", "/tmp/mars-evil-abs"),
        _tar(tmp_path / "link.tar", "out", link="/etc"),
        _tar(tmp_path / "uplink.tar", "up", link="../../.."),
        zipped,
    ]
    for archive in bad:
        with pytest.raises(ValueError, match="refused archive"):
            spaces.seed("s", archive)
    ws = spaces.open("s")
    assert list(ws.path.iterdir()) == []  # nothing landed, not even part of an archive
    assert not (root / "x").exists() and not (root.parent / "x").exists()
    assert not Path("/tmp/mars-evil-abs").exists() and not (root.parent / "zipped-out").exists()
    assert [p.name for p in spaces.root.iterdir()] == [ws.path.name]  # no staging left
    spaces.close()


def test_seeding_refuses_what_is_not_a_seed(tmp_path: Path, root: Path) -> None:
    spaces = Workspaces(root)
    other = spaces.open("other")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip")
    cases = [
        (other.path, "inside the workspace root"),
        (tmp_path / "notes.txt", "give a directory or a .tar"),
        (tmp_path / "broken.tar.gz", "cannot read archive"),
    ]
    for source, words in cases:
        with pytest.raises(ValueError, match=words):
            spaces.seed("s", source)
    with pytest.raises(FileNotFoundError):
        spaces.seed("s", tmp_path / "missing")
    small = Workspaces(root.parent / "small", max_seed_bytes=10)
    with pytest.raises(ValueError, match="more than 10 bytes"):
        small.seed("s", make_tree(tmp_path / "tree"))
    spaces.close()
    small.close()


def test_a_seed_replaces_links_instead_of_writing_through_them(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    spaces = Workspaces(root)
    ws = spaces.open("s")
    (ws.path / "pkg").symlink_to(outside)  # as a tool could have made it
    seed = tmp_path / "seed"
    (seed / "pkg").mkdir(parents=True)
    (seed / "pkg" / "f").write_text("x")
    spaces.seed("s", seed)
    assert list(outside.iterdir()) == []
    assert (ws.path / "pkg").is_dir() and not (ws.path / "pkg").is_symlink()
    spaces.close()


@pytest.mark.parametrize("pid", [1, 12_345, 19_999, 20_000, 4_194_303])
def test_session_uids_are_a_range_per_server_and_stay_below_2_31(
    pid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two servers on one machine must not share session uids (RLIMIT_NPROC, kill_uid), and a uid
    # at or past 2**31 cannot be mapped into bubblewrap's user namespace (uid map: EINVAL).
    from mars.tools import workspace

    monkeypatch.setattr(workspace.os, "getpid", lambda: pid)
    base = workspace._uid_base()
    assert base >= 200_000 and base + workspace.UID_RANGE < 2**31
    monkeypatch.setattr(workspace.os, "getpid", lambda: pid + 1)
    other = workspace._uid_base()
    assert abs(other - base) >= workspace.UID_RANGE
