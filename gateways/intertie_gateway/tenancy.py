"""Tenants at a site: who is calling, whose a task is, and who may see it. Pure.

A site's own tenants are named by its tokens ("acme"). A task a peer forwarded here belongs
to that peer's tenant, known here as "tenant@home" ("acme@alpha"): the peer vouches for the
tenant, the certificate for the peer. With ``auth = "none"`` there is one anonymous tenant
("") and no isolation, as on a trusted network.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

# A tenant's name, as tokens carry it.
TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# How a forwarded task's tenant is written here when its home had no authentication.
ANONYMOUS_NAME = "anonymous"
# A pattern no tenant's name matches (names start with a letter or digit): what a site whose
# policy accepts no one tells its peers, whose empty list would mean "everyone" (older sites).
SERVES_NO_ONE = "-"


@dataclass(frozen=True, slots=True)
class Caller:
    """``tenant``: the tenant calling ("" anonymous, with auth none); ``peer``: the site id a
    peer proved with its certificate, or whose link was verified (then ``tenant`` is "");
    ``token_id``: the id of the token the tenant showed."""

    tenant: str = ""
    peer: str = ""
    token_id: str = ""  # the token a tenant showed (its session ends when it is revoked)


ANONYMOUS = Caller()


def scope(tenant: str) -> str:
    """What a site puts before a tenant's task ids: each tenant's ids are its own, so one
    tenant's id never meets another's ("" for the anonymous tenant: ids as they are)."""
    return f"{tenant}~" if tenant else ""


def foreign(tenant: str, home: str) -> str:
    """How this site names the tenant of a task forwarded by ``home``."""
    return f"{tenant or ANONYMOUS_NAME}@{home}"


def owner_here(owner: str, holder: str, here: str) -> str:
    """The owner of a replica as this site names it. A site names its own tenants plainly and
    another site's as ``tenant@site`` (as a forwarded task's tenant is named), so a tenant of
    the holder becomes ``tenant@holder``, and this site's own tenant, named by the holder as
    ``tenant@here``, becomes ``tenant`` again."""
    if not owner:  # the holder's anonymous tenant (a site without token auth)
        return foreign("", holder)
    if "@" not in owner:
        return f"{owner}@{holder}"
    return owner.removesuffix(f"@{here}")


def matches(tenant: str, pattern: str) -> bool:
    """A tenant's name against a policy's pattern ("acme", "acme@alpha", "*@alpha", "*")."""
    return tenant == pattern or ("*" in pattern and fnmatch.fnmatchcase(tenant, pattern))


def accepted(tenant: str, patterns: Iterable[str]) -> bool:
    return any(matches(tenant, pattern) for pattern in patterns)


def may_see(tenant: str, home: str, who: Caller, *, isolated: bool) -> bool:
    """Whether ``who`` may see (read, follow, cancel) a task or dataset of ``tenant`` whose
    home is ``home`` ("": this site). A peer sees what it forwarded here; a tenant what it
    submitted here. Not isolated (auth none): everyone sees everything, as before tenants."""
    if who.peer:
        return home == who.peer
    if not isolated:
        return True
    return not home and tenant == who.tenant
