"""Tenants: who a request comes from, and which sessions are theirs.

Without API keys the server is single-tenant: every client may act in every session, so it must
listen on loopback only. With keys (`--api-key` repeated, `--api-keys-file`, `--admin-key`) each
key is a tenant, named by a short hash of the key (`t-` and 12 hex digits: safe to log; the key
itself is never logged or shown). The first request that names a session (a chat or completion
call, a tool run, a seed) makes its tenant the session's owner; another tenant naming it gets a
404, as if it did not exist, on every route, and `/v1/events` shows it only its own sessions'
events (and the system-wide ones that carry no session, such as `admission_window`). An admin
key sees and may act on every session.

Ownership is `mars.server.owners`'s; this module only parses the keys and resolves them, and
imports no web framework (the `mars` command parses its options without one).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mars.core.errors import UsageError

SCOPE_KEY = "mars.tenant"  # where the guard puts the request's Tenant in the ASGI scope
KEYS_FILE_FORMAT = (
    "one key per line, 'KEY' or 'KEY admin'; blank lines and lines starting with # are ignored"
)
_KEY = re.compile(r"[!-~]+")  # printable ASCII without spaces: it must fit a header as it is


@dataclass(frozen=True)
class Tenant:
    """The owner of a key."""

    name: str  # "t-" and the first 12 hex digits of the key's SHA-256
    admin: bool = False  # sees and may act on every session


class Keys:
    """The accepted keys, each resolved to its tenant."""

    def __init__(self, keys: dict[str, bool]) -> None:  # key -> admin
        self._tokens = [
            (f"Bearer {k}".encode(), Tenant(tenant_name(k), a)) for k, a in keys.items()
        ]

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def admins(self) -> int:
        return sum(t.admin for _, t in self._tokens)

    def resolve(self, authorization: bytes) -> Tenant | None:
        """The tenant of an `Authorization` header, or None. Every key is compared, in constant
        time, so the answer's timing says nothing about which key came close."""
        found = None
        for token, tenant in self._tokens:
            if hmac.compare_digest(authorization, token):
                found = tenant
        return found


def tenant_name(key: str) -> str:
    return "t-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_keys(
    api_keys: Sequence[str], admin_keys: Sequence[str] = (), keys_file: Path | None = None
) -> Keys | None:
    """The keys from the command line and the keys file; None when there are none (the
    single-tenant default). A UsageError says what to fix, without echoing any key."""
    keys: dict[str, bool] = {}
    where: dict[str, str] = {}

    def add(key: str, admin: bool, origin: str) -> None:
        if not key:
            raise UsageError(f"{origin}: the key is empty: give a key, or leave the option out")
        if not _KEY.fullmatch(key):
            raise UsageError(f"{origin}: a key must be printable ASCII without spaces")
        if key in keys:
            raise UsageError(f"{origin}: the same key is given twice (also {where[key]})")
        keys[key], where[key] = admin, origin

    for key in api_keys:
        add(key, False, "--api-key")
    for key in admin_keys:
        add(key, True, "--admin-key")
    if keys_file is not None:
        before = len(keys)
        for n, line in enumerate(_read(keys_file), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2 or (len(fields) == 2 and fields[1] != "admin"):
                raise UsageError(
                    f"--api-keys-file {keys_file}, line {n}: expected 'KEY' or 'KEY admin' "
                    f"({KEYS_FILE_FORMAT})"
                )
            add(fields[0], len(fields) == 2, f"--api-keys-file {keys_file}, line {n}")
        if len(keys) == before:
            raise UsageError(f"--api-keys-file {keys_file}: no keys in it ({KEYS_FILE_FORMAT})")
    return Keys(keys) if keys else None


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"--api-keys-file {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--api-keys-file {path}: not a UTF-8 text file") from None
