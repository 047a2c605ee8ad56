"""`serve` and `worker` at start, and on SIGHUP: the rules folder meets the published versions.

Never published: checked like `rules publish`, published and run. Published but not active
(rolled back or forward since): not re-activated; the active version runs, with a notice.
Nothing active: the folder is published. SIGHUP publishes the folder when it differs from the
active version, even a retired one; a folder that fails its checks changes nothing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from engine.cli.startup import active_rules, publish_on_hangup, settle
from engine.rules.versions import collect
from engine.storage import NewRuleVersion, Storage
from tests.support.paths import REPO
from tests.support.shipped import SHIPPED_CASES

pytestmark = pytest.mark.anyio

BACKENDS = ("sqlite", "postgresql")


def rules_folder(folder: Path, edit: str = "", *, failing_test: bool = False) -> Path:
    """A copy of the shipped rules (with their tests); `edit` rewords a rule's description (a
    new version whose tests still pass); `failing_test` makes one rule test fail."""
    shutil.copytree(REPO / "rules", folder)
    rules = folder / "attribution.yaml"
    if edit:
        text = rules.read_text()
        marker = "  - name: install-creates-lead\n    description: >-\n"
        assert marker in text
        rules.write_text(text.replace(marker, marker + f"      {edit}\n", 1))
    if failing_test:
        tests = folder / "attribution_test.yaml"
        tests.write_text(tests.read_text().replace("stage: lead}", "stage: customer}", 1))
    return folder


async def test_a_folder_never_published_is_checked_published_and_run(
    storage: Storage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = rules_folder(tmp_path / "rules")
    version = collect([folder]).version
    assert await settle(storage, folder) == version
    assert f"published the rules in {folder} as {version}; active now" in capsys.readouterr().err
    assert await storage.rule_versions.current() == (version, None)
    rules = await active_rules(storage, version)
    assert rules.active.version == version and rules.shadow is None
    # Restarted with an edited folder: the edit is published and runs (edit-and-restart).
    edited = rules_folder(tmp_path / "edited", "edited")
    new = collect([edited]).version
    assert await settle(storage, edited) == new
    assert f"as {new}; active now (was {version})" in capsys.readouterr().err
    # Restarted unchanged: nothing to say.
    assert await settle(storage, edited) == new
    assert capsys.readouterr().err == ""


async def test_a_folder_failing_its_tests_exits_1_and_publishes_nothing(
    storage: Storage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = rules_folder(tmp_path / "rules", "broken", failing_test=True)
    with pytest.raises(SystemExit) as stopped:
        await settle(storage, folder)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "FAIL install (shape A) creates a lead" in err
    assert (f"error: 1 of {SHIPPED_CASES} rule tests failed in {folder}, so they are not "
            "published and nothing changed") in err
    assert await storage.rule_versions.list_versions() == []


async def test_a_folder_published_before_but_not_active_is_not_reactivated(
    storage: Storage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = rules_folder(tmp_path / "old")
    new = rules_folder(tmp_path / "new", "new")
    old_version = await settle(storage, old)
    new_version = await settle(storage, new)
    capsys.readouterr()
    # Someone rolled back to the old version; a process started from the new folder...
    await storage.rule_versions.activate(old_version)
    assert await settle(storage, new) == old_version  # ...runs the active one
    err = capsys.readouterr().err.strip()
    assert err == (f"notice: running the active rule version {old_version}, not {new_version} "
                   f"from {new} (published before, then rolled back or forward); to run the "
                   f"folder's rules: linkcrm rules activate {new_version}")
    assert len(err.splitlines()) == 1
    assert await storage.rule_versions.current() == (old_version, None)


async def test_with_no_active_version_the_folder_is_published_even_if_stored_as_shadow(
    storage: Storage, tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path / "rules")
    files = collect([folder])
    await storage.rule_versions.publish(NewRuleVersion(files.version, files.files, "t"),
                                        "shadow")
    assert await storage.rule_versions.active_version() is None
    assert await settle(storage, folder) == files.version
    assert await storage.rule_versions.current() == (files.version, None)


async def test_sighup_publishes_the_folder_even_a_retired_version_and_refuses_failing_rules(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.worker.rules")
    folder = rules_folder(tmp_path / "rules")
    first = await settle(storage, folder)
    second = await settle(storage, rules_folder(tmp_path / "other", "other"))
    # The folder is the retired first version: SIGHUP is an explicit wish, so it is active again.
    await publish_on_hangup(storage, folder)
    assert await storage.rule_versions.active_version() == first
    assert f"SIGHUP: published the rules in {folder} as {first} (was {second})" in caplog.text
    await publish_on_hangup(storage, folder)  # unchanged: nothing to do
    assert f"are the active version {first} already" in caplog.text
    # An edit that fails its tests: logged, and the running version stays.
    broken = rules_folder(tmp_path / "broken", "broken", failing_test=True)
    caplog.clear()
    await publish_on_hangup(storage, broken)
    assert await storage.rule_versions.active_version() == first
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"SIGHUP: the rules in {broken} are not published: 1 of {SHIPPED_CASES} rule tests "
        "failed; the running version stays"]
    assert any("FAIL install (shape A)" in line for line in errors[0].problems)  # type: ignore[attr-defined]
