"""Webhook signatures: pure functions, no I/O."""

from __future__ import annotations

import hashlib
import hmac


def hmac_sha1_hex(key: str, body: bytes) -> str:
    """Shoptet's signature: lowercase hex HMAC-SHA1 of the raw body (never a re-serialised one)."""
    return hmac.new(key.encode(), body, hashlib.sha1).hexdigest()


def verify_hmac_sha1_hex(key: str, body: bytes, signature: str | None) -> bool:
    """Constant-time check of a hex HMAC-SHA1 signature; hex case does not matter."""
    if not signature or not key or not signature.isascii():
        return False  # compare_digest refuses non-ASCII str; such a signature is wrong anyway
    return hmac.compare_digest(hmac_sha1_hex(key, body), signature.strip().lower())


def constant_time_equals(expected: str, given: str | None) -> bool:
    """Compare a shared secret (e.g. Bitrix24's application token) without a timing leak."""
    if given is None or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())  # bytes: any text is fine
