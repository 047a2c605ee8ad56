"""The field map's `links:` section: which links are per-person, which shared, and the `link`
object rules read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.config.fieldmap import load_field_map
from engine.config.links import LinkPolicy, link_of_event
from engine.errors import ConfigError
from tests.support.paths import REPO

POLICY = LinkPolicy(per_person_prefixes=("invite",), per_person_with_referrer=True,
                    shared_prefixes=("promo",), shared_tokens=("summer-promo",))


def envelope(**data: object) -> dict[str, object]:
    return {"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z", "data": data}


@pytest.mark.parametrize(("data", "per_person", "why"), [
    ({"token": "t", "prefix": "invite"}, True, "prefix 'invite' is declared per-person"),
    ({"token": "t", "referrer_token": "tok_a"}, True, "the event names a referrer"),
    ({"referral_code": "C-1", "referrer_id": "u_1"}, True, "the event names a referrer"),
    ({"token": "t", "prefix": "promo", "referrer_token": "x"}, False, "declared shared"),
    ({"token": "summer-promo", "prefix": "invite"}, False, "its token is declared shared"),
    ({"token": "t"}, True, "nothing declares it; links.default is per_person"),
])
def test_a_link_is_per_person_or_shared_by_declaration(
    data: dict[str, object], per_person: bool, why: str
) -> None:
    link = link_of_event(envelope(**data), POLICY)
    assert link["per_person"] is per_person
    assert why in link["why"]
    assert link["person_token"] == (link["token"] if per_person else None)


def test_an_event_without_a_token_has_no_link() -> None:
    assert link_of_event(envelope(platform="ios"), POLICY) == {
        "token": None, "per_person": False, "person_token": None,
        "why": "the event carries no token"}


def test_an_identify_event_follows_its_touches_then_the_declarations() -> None:
    identify = {"event": "app.user_identified", "timestamp": "2026-03-02T00:00:00Z",
                "data": {"token": "t9", "email": "a@example.com"}}
    shared = link_of_event({**identify, "touch": {"last": {"prefix": "promo"}}}, POLICY)
    assert shared["per_person"] is False and shared["why"].startswith("from its touches")
    expired = link_of_event({**identify, "touch": {"last": None,
                                                   "link": {"prefix": "invite"}}}, POLICY)
    assert expired["person_token"] == "t9"
    never = link_of_event({**identify, "touch": {"last": None, "link": None}},
                          LinkPolicy(default="shared"))
    assert never["per_person"] is False
    assert never["why"] == "no touch of the token: nothing declares it; links.default is shared"


def test_the_shipped_field_map_declares_invites_per_person_and_promos_shared() -> None:
    links = load_field_map(REPO / "rules" / "fields.yaml").links
    assert links.per_person_prefixes == ("invite",) and links.per_person_with_referrer
    assert links.shared_prefixes == ("promo", "share")
    assert "install.tracked" in links.touch_events


def _map_with(tmp_path: Path, links: str) -> Path:
    path = tmp_path / "fields.yaml"
    shutil.copy(REPO / "rules" / "fields.yaml", path)
    text = path.read_text(encoding="utf-8")
    start = text.index("links:\n")
    end = text.index("\ntargets:\n")
    path.write_text(text[:start] + links + text[end:], encoding="utf-8")
    return path


def test_a_prefix_both_per_person_and_shared_is_an_error(tmp_path: Path) -> None:
    path = _map_with(tmp_path, "links:\n  per_person: {prefixes: [invite]}\n"
                               "  shared: {prefixes: [promo, invite]}\n")
    with pytest.raises(ConfigError) as raised:
        load_field_map(path)
    [problem] = raised.value.problems
    assert problem.code == "link-kind-conflict"
    assert "prefix 'invite' is declared both per-person and shared" in problem.message
    assert "remove it from" in problem.hint


def test_a_bad_links_section_fails_the_schema(tmp_path: Path) -> None:
    path = _map_with(tmp_path, "links:\n  default: everyone\n  shared: {prefixes: promo}\n")
    with pytest.raises(ConfigError) as raised:
        load_field_map(path)
    messages = " ".join(p.message for p in raised.value.problems)
    assert "everyone" in messages and "promo" in messages
