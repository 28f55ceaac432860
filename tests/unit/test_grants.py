"""What a stored grant may be (mqfast.grants), and how it joins the claim grants of a token."""

from __future__ import annotations

import pytest

from mqfast import errors
from mqfast.auth import Authenticator, Grant, make_token
from mqfast.config import Settings
from mqfast.grants import check_request, glob_error
from mqfast.messages import CreateGrantRequest

SETTINGS = Settings(jwt_secret="unit-grants-secret-0123456789-0123456789")


@pytest.mark.parametrize(
    "pattern", ["*", "orders.*", "orders.?u", "orders.[a-z]*", "[!_]x", "a-b_c.D9", "[.]"]
)
def test_topic_globs(pattern: str) -> None:
    assert glob_error(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "empty"),
        ("x" * 250, "longer than 249"),
        ("orders.[eu", "unclosed '['"),
        ("orders.[]", "empty '[]'"),
        ("orders.[!]", "empty '[]'"),
        ("orders]", "']' at position 6"),
        ("orders/eu", "'/' at position 6"),
        ("a b", "' ' at position 1"),
        ("[a/b]", "'/' in a '[...]' set"),
        ("!x", "'!' at position 0"),
    ],
)
def test_what_is_not_a_topic_glob(pattern: str, says: str) -> None:
    reason = glob_error(pattern)
    assert reason is not None and says in reason


def test_a_request_becomes_one_grant() -> None:
    req = CreateGrantRequest("svc", "orders.*", ["consume", "produce", "consume"], ["b", "a"])
    assert check_request(req) == Grant("orders.*", frozenset({"produce", "consume"}), {"a", "b"})
    with pytest.raises(errors.BadRequest) as e:
        check_request(CreateGrantRequest("svc", "t", ["produce"], ["ok", "a\x00"]))
    assert e.value.field == "groups[1]"
    with pytest.raises(errors.BadRequest) as e:
        check_request(CreateGrantRequest("x" * 1025, "t", ["produce"]))
    assert e.value.field == "subject"


def test_stored_grants_are_added_to_the_claim_grants_and_forgotten_by_subject() -> None:
    auth = Authenticator(SETTINGS)
    stored = {"svc": (Grant("orders.*", frozenset({"produce"})),)}
    auth.stored_grants = lambda subject: stored.get(subject, ())
    claims = [{"topics": "logs", "actions": ["produce"]}]
    svc, other = make_token(SETTINGS, "svc", grants=claims), make_token(SETTINGS, "other")
    p = auth.verify_sync(svc)
    assert p.allows("produce", "logs") and p.allows("produce", "orders.eu")
    assert not p.allows("consume", "orders.eu")
    assert not auth.verify_sync(other).allows("produce", "orders.eu")
    # Cached until the subject's grants change, then verified again with the new ones.
    stored["svc"] = ()
    assert auth.verify_sync(svc) is p
    kept = auth.verify_sync(other)
    auth.forget_subject("svc")
    again = auth.verify_sync(svc)
    assert again is not p and not again.allows("produce", "orders.eu")
    assert again.allows("produce", "logs")
    assert auth.verify_sync(other) is kept  # another subject's principal is not dropped
