"""[notify]: optional; when present, a valid From, a share below 1, and templates checked at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendmail_shim.config import ConfigError, from_mapping

BASE = {"upstream": {"host": "smtp.example.net"}, "spf": {"relay_ips": ["192.0.2.25"]}}


def notify(**values: object) -> dict:
    return {**BASE, "notify": {"from": "varsel@provider.example", **values}}


def test_no_section_means_no_notices_and_the_defaults_otherwise() -> None:
    assert from_mapping(BASE).notify is None
    config = from_mapping(notify()).notify
    assert config is not None
    assert (config.sender, config.admin, config.warn_at, config.language) == (
        "varsel@provider.example", (), 0.8, "en")
    assert config.texts == {}  # no directory: the built-in texts, read when a notice is due
    assert {config.template(k).source for k in ("warn", "limit", "block")} == {
        "built-in warn.en.txt", "built-in limit.en.txt", "built-in block.en.txt"}
    assert from_mapping(notify(admin="a@p.example")).notify.admin == ("a@p.example",)  # type: ignore[union-attr]


@pytest.mark.parametrize(("values", "problem"), [
    ({"from": None}, "notify.from: missing"),
    ({"from": "not an address"}, "notify.from: 'not an address' is not"),
    ({"admin": ["ok@p.example", "Support <s@p.example>"]}, "notify.admin: 'Support <s@p.example>' is not a bare"),
    ({"warn_at": 1}, "notify.warn_at: must be more than 0 and less than 1"),
    ({"warn_at": 0}, "notify.warn_at: must be more than 0 and less than 1"),
    ({"language": "sv"}, "notify.language: 'sv' is not one of: 'en', 'nb'"),
    ({"templates": "/nonexistent-dir"}, "notify.templates: '/nonexistent-dir' is not a directory"),
    ({"colour": "red"}, "notify.colour: unknown key"),
])
def test_a_bad_value_names_its_key(values: dict, problem: str) -> None:
    data = notify(**values)
    data["notify"] = {k: v for k, v in data["notify"].items() if v is not None}
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        from_mapping(data)


def test_a_bad_template_is_a_config_error_naming_the_file_and_the_placeholder(tmp_path: Path) -> None:
    (tmp_path / "limit.en.txt").write_text("Subject: Stopped $who\n\nYou sent $usd messages.\n")
    with pytest.raises(ConfigError) as caught:
        from_mapping(notify(templates=str(tmp_path)))
    text = str(caught.value)
    assert "notify.templates" in text and str(tmp_path / "limit.en.txt") in text
    assert "unknown placeholder $usd" in text and "$used" in text
    (tmp_path / "limit.en.txt").write_text("No subject line here\n\nbody\n")
    with pytest.raises(ConfigError, match="must start with one line 'Subject: ...'"):
        from_mapping(notify(templates=str(tmp_path)))
    (tmp_path / "limit.en.txt").write_text("Subject: costs $5\n\nbody\n")
    with pytest.raises(ConfigError, match=r"a '\$' that starts no placeholder"):
        from_mapping(notify(templates=str(tmp_path)))


def test_a_template_file_replaces_only_its_kind_and_language(tmp_path: Path) -> None:
    (tmp_path / "warn.nb.txt").write_text("Subject: Snart fullt for $who\n\n$used av $limit.\n")
    (tmp_path / "warn.en.txt").write_text("Subject: not used: the language is nb\n\n$used\n")
    config = from_mapping(notify(templates=str(tmp_path), language="nb")).notify
    assert config is not None
    assert config.template("warn").source == str(tmp_path / "warn.nb.txt")
    assert config.template("limit").source == "built-in limit.nb.txt"
    assert config.template("warn").render({"who": "post@a.example", "used": "8", "limit": "10"}) == (
        "Snart fullt for post@a.example", "8 av 10.\n")


@pytest.mark.parametrize("language", ["en", "nb"])
def test_every_built_in_template_uses_only_known_placeholders(language: str) -> None:
    config = from_mapping(notify(language=language)).notify
    assert config is not None
    assert {config.template(kind).language for kind in ("warn", "limit", "block")} == {language}


def test_a_reload_names_notify_turned_on_off_and_changed() -> None:
    from sendmail_shim.gate.reload import changes

    off, on = from_mapping(BASE), from_mapping(notify())
    assert changes(off, on) == ["notify: off -> on"]
    assert changes(on, off) == ["notify: on -> off"]
    assert changes(on, from_mapping(notify(warn_at=0.9, language="nb"))) == [
        "notify.warn_at: 0.8 -> 0.9", "notify.language: en -> nb"]
