"""Session workspaces: one private directory per session under a root, seeded and removed.

Session ids come from clients, so a directory name is the id with every unsafe character replaced,
cut short, plus a hash of the whole id: no id can name `..`, a path, or another session's
directory. When mars runs as root each session gets its own uid from a high range, owning its
directory (mode 0700): RLIMIT_NPROC then counts per session, and sessions cannot read each other's
files even outside the sandbox.

Seeding copies a directory or extracts an archive (.tar, .tar.gz, .tgz, .zip) into a fresh staging
directory first (tar with the `data` filter, zip checked by hand, both refusing absolute paths,
`..` and links that leave the tree), then moves the staged entries in. The move never follows a
link a tool created: it descends only into real directories, and the runtime seeds only while the
session has no tool running.

A temporary root holds an owner file, locked (flock) for as long as its server lives: the kernel
drops the lock when the server dies, even by SIGKILL, so the next server to start removes the
roots whose lock is free and never one whose server still runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mars.core.errors import UsageError

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")
ROOT_PREFIX = "mars-tools-"  # temporary roots, in tempfile.gettempdir()
OWNER = ".owner"  # in a temporary root: its server's pid, locked while that server lives
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Workspace:
    path: Path  # on the host
    uid: int | None  # the session's own uid, or None: tools run as the server's user


def dir_name(session_id: str) -> str:
    """A directory name for `session_id` that is safe and distinct from every other id's."""
    if not session_id:
        raise ValueError("the session id is empty")
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', session_id)[:48].strip('.')}-{digest}"


class Workspaces:
    """The workspaces of one server. `root=None`: a temporary root, removed by `close()` (or,
    when the server is killed, by the next one to start: see `reap_dead_roots`)."""

    def __init__(
        self, root: Path | None = None, uid_base: int | None = None, max_seed_bytes: int = 4 << 30
    ) -> None:
        self._owned = root is None
        self._owner_fd: int | None = None
        if root is None:
            reap_dead_roots(Path(tempfile.gettempdir()))
            root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
            self._owner_fd = _claim(root)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.root = self.root.resolve()  # so a seed path can be compared with it
        self.per_session_uid = os.geteuid() == 0
        if self.per_session_uid:
            # Session uids must reach their directory: traverse, but not list, the root.
            self.root.chmod(0o711)
            _check_traversable(self.root)
        self.max_seed_bytes = max_seed_bytes
        self._uid_next = _uid_base() if uid_base is None else uid_base
        self._open: dict[str, Workspace] = {}

    def get(self, session_id: str) -> Workspace | None:
        return self._open.get(session_id)

    def opened(self) -> list[Workspace]:
        return list(self._open.values())

    def open(self, session_id: str) -> Workspace:
        """The session's workspace, created (empty) on first use."""
        found = self._open.get(session_id)
        if found is not None:
            return found
        path = self.root / dir_name(session_id)
        uid = self._new_uid() if self.per_session_uid else None
        if path.exists():  # left over by an earlier server with the same root
            _remove_tree(path)
        path.mkdir(mode=0o700)
        if uid is not None:
            os.chown(path, uid, uid)
        self._open[session_id] = ws = Workspace(path, uid)
        return ws

    def seed(self, session_id: str, source: Path) -> Workspace:
        """Copy directory `source`, or extract archive `source`, into the session's workspace."""
        source = source.resolve()
        if source == self.root or self.root in source.parents:
            raise ValueError(f"{source} is inside the workspace root: seed from elsewhere")
        ws = self.open(session_id)
        staging = Path(tempfile.mkdtemp(prefix=".seed-", dir=self.root))
        try:
            if source.is_dir():
                self._copy_dir(source, staging)
            elif source.is_file() and source.name.endswith(ARCHIVES):
                self._extract(source, staging)
            elif source.exists():
                raise ValueError(
                    f"cannot seed from {source}: give a directory or a {', '.join(ARCHIVES)} file"
                )
            else:
                raise FileNotFoundError(f"no such file or directory: {source}")
            if ws.uid is not None:
                _chown_tree(staging, ws.uid)
            _merge(staging, ws.path)
        finally:
            _remove_tree(staging)
        return ws

    def remove(self, session_id: str) -> bool:
        """Delete the session's workspace; False when it had none."""
        ws = self._open.pop(session_id, None)
        if ws is None:
            return False
        _remove_tree(ws.path)
        return True

    def close(self) -> None:
        for session_id in list(self._open):
            self.remove(session_id)
        if self._owned:
            _remove_tree(self.root)
        if self._owner_fd is not None:  # unlocked only once removed: no reaper races us
            os.close(self._owner_fd)
            self._owner_fd = None

    def _new_uid(self) -> int:
        while True:
            uid, self._uid_next = self._uid_next, self._uid_next + 1
            try:
                pwd.getpwuid(uid)
            except KeyError:
                return uid  # not a real user of this machine

    def _copy_dir(self, source: Path, staging: Path) -> None:
        total = 0
        for dirpath, _, files in os.walk(source):
            for name in files:
                total += os.lstat(os.path.join(dirpath, name)).st_size
                self._check_size(total, source)
        # Links are copied as links (their targets do not exist in the sandbox); fifos, sockets
        # and devices are left out: opening them could block or reach the host.
        shutil.copytree(source, staging, symlinks=True, ignore=_specials, dirs_exist_ok=True)

    def _extract(self, archive: Path, staging: Path) -> None:
        try:
            if archive.name.endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    members = zf.infolist()
                    for info in members:
                        _check_member(info.filename, archive)
                    self._check_size(sum(i.file_size for i in members), archive)
                    zf.extractall(staging)
            else:
                with tarfile.open(archive) as tf:
                    tar_members = tf.getmembers()
                    for member in tar_members:  # the filter would quietly strip a leading "/"
                        _check_member(member.name, archive)
                    self._check_size(sum(m.size for m in tar_members), archive)
                    tf.extractall(staging, filter="data")
        except tarfile.FilterError as e:
            raise ValueError(f"refused archive {archive}: {e}") from None
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"cannot read archive {archive}: {e}") from None

    def _check_size(self, total: int, source: Path) -> None:
        if total > self.max_seed_bytes:
            raise ValueError(
                f"{source} holds more than {self.max_seed_bytes} bytes: seed from something smaller"
            )


def reap_dead_roots(parent: Path) -> list[Path]:
    """Remove the temporary roots in `parent` whose server died without `close()`: those of this
    user whose owner file is not locked. A root without one (being made, or by an older mars) is
    left alone. Answers the roots removed."""
    reaped = []
    for root in sorted(parent.glob(ROOT_PREFIX + "*")):
        try:
            st = os.lstat(root)
            fd = os.open(root / OWNER, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone, or no owner file (yet)
        try:
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue  # a link, or another user's
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its server lives (or another one is removing it)
            _remove_tree(root)
            reaped.append(root)
        finally:
            os.close(fd)
    return reaped


def _claim(root: Path) -> int:
    """Lock a fresh owner file in `root` for this process's lifetime. It is locked under another
    name and then renamed, so a reaper never finds it unlocked while `root` is being set up."""
    fresh = root / (OWNER + ".new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(fresh, root / OWNER)
    return fd


def _check_member(name: str, archive: Path) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or ":" in (parts[0] if parts else ""):
        raise ValueError(f"refused archive {archive}: member {name!r} would land outside it")


def _specials(directory: str, names: list[str]) -> set[str]:
    skipped = set()
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            skipped.add(name)
    return skipped


def _merge(staging: Path, dest: Path) -> None:
    """Move staging's entries into dest, replacing what is there; links in dest are not followed."""
    for entry in os.scandir(staging):
        target = dest / entry.name
        try:
            mode: int | None = os.lstat(target).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and stat.S_ISDIR(mode) and entry.is_dir(follow_symlinks=False):
            _merge(Path(entry.path), target)
            continue
        if mode is not None:
            if stat.S_ISDIR(mode):
                _remove_tree(target)
            else:
                target.unlink()
        os.rename(entry.path, target)


UID_RANGE = 100_000  # session uids a server takes before it could meet another's
_UID_RANGES = 20_000  # ranges, all below 2**31 (see _uid_base)


def _uid_base() -> int:
    """The first session uid of this server: a range of its own (chosen by its pid), so that
    two servers on one machine never share a uid, an RLIMIT_NPROC count, or a `kill_uid` at a
    session's end. All below 2**31: bubblewrap fails to map a larger one ("setting up uid map:
    Invalid argument")."""
    return 200_000 + (os.getpid() % _UID_RANGES) * UID_RANGE


def _chown_tree(top: Path, uid: int) -> None:
    os.chown(top, uid, uid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _remove_tree(path: Path) -> None:
    """rmtree that also removes what a tool made unwritable (mode 000 directories)."""

    def retry(func: object, failed: str, _: object) -> None:
        parent = os.path.dirname(failed)
        os.chmod(parent, 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
            shutil.rmtree(failed, ignore_errors=True)
        else:
            os.unlink(failed)

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=retry)


def _check_traversable(root: Path) -> None:
    for parent in [root, *root.parents]:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise UsageError(
                f"{parent} is not searchable by other users, so session uids cannot reach "
                f"{root}: chmod o+x {parent} or choose another --workspace-root"
            )
