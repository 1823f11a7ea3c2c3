import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.signing import constant_time_equals, hmac_sha1_hex, verify_hmac_sha1_hex

KEY = "0123456789abcdef0123456789abcdef"
BODY = (
    b'{"eshopId":222651,"event":"order:update",'
    b'"eventCreated":"2019-01-08T15:13:39+0100","eventInstance":"2018000057"}'
)


def test_matches_an_independent_hmac_sha1() -> None:
    assert hmac_sha1_hex(KEY, BODY) == hmac.new(KEY.encode(), BODY, hashlib.sha1).hexdigest()


@pytest.mark.parametrize(
    ("signature", "ok"),
    [
        (hmac_sha1_hex(KEY, BODY), True),
        (hmac_sha1_hex(KEY, BODY).upper(), True),  # hex case does not matter
        (" " + hmac_sha1_hex(KEY, BODY) + " ", True),
        (hmac_sha1_hex(KEY, BODY + b" "), False),  # a re-serialised body does not verify
        (hmac_sha1_hex("another-key", BODY), False),
        (hashlib.sha256(BODY).hexdigest(), False),  # the wrong algorithm some docs claim
        ("", False),
        (None, False),
    ],
)
def test_verify(signature: str | None, ok: bool) -> None:
    assert verify_hmac_sha1_hex(KEY, BODY, signature) is ok


def test_empty_key_never_verifies() -> None:
    assert not verify_hmac_sha1_hex("", BODY, hmac_sha1_hex("", BODY))


@given(st.binary(max_size=512), st.text(min_size=1, max_size=40))
def test_roundtrip(body: bytes, key: str) -> None:
    assert verify_hmac_sha1_hex(key, body, hmac_sha1_hex(key, body))


@pytest.mark.parametrize(
    ("expected", "given_", "ok"),
    [("tok", "tok", True), ("tok", "tok2", False), ("tok", None, False), ("", "", False)],
)
def test_constant_time_equals(expected: str, given_: str | None, ok: bool) -> None:
    assert constant_time_equals(expected, given_) is ok
