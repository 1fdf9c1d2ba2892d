"""A site's signed checkpoint of its usage ledger: the tree head (size, root hash, time) and
the site's Ed25519 signature over a fixed text, which anyone holding the site's public key
checks without trusting the site (the SDK, the CLI, a peer holding receipts).

The signed text is ``intertie-ledger-checkpoint/v1\n<site>\n<size>\n<root, base64>\n<time, %.3f>\n``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CHECKPOINT_FORMAT = "intertie-ledger-checkpoint/v1"


@dataclass(frozen=True)
class Checkpoint:
    """The site's signature over the tree of the first ``size`` entries, made at ``time``."""

    site: str
    size: int
    root: bytes
    time: float
    signature: bytes

    def signed_text(self) -> bytes:
        return checkpoint_text(self.site, self.size, self.root, self.time)


def checkpoint_text(site: str, size: int, root: bytes, at: float) -> bytes:
    """What a checkpoint's signature covers. ``at`` is stored to the millisecond, so ``%.3f``
    prints it the same from any language's double."""
    return f"{CHECKPOINT_FORMAT}\n{site}\n{size}\n{base64.b64encode(root).decode()}\n{at:.3f}\n".encode()


def signed_by(checkpoint: Checkpoint, public_key: bytes) -> bool:
    """Whether ``public_key`` (raw Ed25519, 32 bytes) signed ``checkpoint``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(checkpoint.signature, checkpoint.signed_text())
    except (InvalidSignature, ValueError):
        return False
    return True
