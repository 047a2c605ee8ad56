"""The README's rule-authoring sections, run: the rule example and the rule-test example agree,
the field-map example loads, the sample mistake prints what the README shows, the `eval`
transcripts are exact, the editor setup works, and no example pins a tag that does not exist."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from engine.config.fieldmap import load_field_map
from engine.config.yamlsource import load_yaml
from tests.support.paths import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
RULES = REPO / "rules"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language` ("" for blocks without one), in order."""
    found: list[str] = []
    current: list[str] | None = None
    kind = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("```") and current is None:
            current, kind = [], line[3:].strip()
        elif line.startswith("```") and current is not None:
            if kind == language:
                found.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return found


def linkcrm(args: list[str], cwd: Path = REPO,
            stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_rule_example_passes_the_rule_test_example(tmp_path: Path) -> None:
    rule_example = next(b for b in blocks(section("The rule language"), "yaml")
                        if b.startswith("version: 1\nrules:"))
    test_example = next(b for b in blocks(section("Rule tests"), "yaml")
                        if b.startswith("version: 1\ncases:"))
    shutil.copy(RULES / "fields.yaml", tmp_path / "fields.yaml")
    (tmp_path / "example.yaml").write_text(rule_example, encoding="utf-8")
    (tmp_path / "example_test.yaml").write_text(test_example, encoding="utf-8")
    validated = linkcrm(["validate", "--strict", str(tmp_path)])
    assert validated.returncode == 0, validated.stdout
    tested = linkcrm(["test", str(tmp_path)])
    assert tested.returncode == 0, tested.stdout
    assert tested.stdout.splitlines()[-1] == "3 passed, 0 failed"


def test_the_field_map_example_is_a_valid_field_map(tmp_path: Path) -> None:
    (example,) = blocks(section("The field map"), "yaml")
    (tmp_path / "fields.yaml").write_text("version: 1\n" + example, encoding="utf-8")
    field_map = load_field_map(tmp_path / "fields.yaml")
    assert [s.name for s in field_map.contact_stages] == ["lead", "customer"]


def test_the_sample_mistake_prints_what_the_readme_shows(tmp_path: Path) -> None:
    shown = next(b for b in blocks(section("Rules in five minutes"), "")
                 if "unknown-action" in b)
    shutil.copytree(RULES, tmp_path / "rules")
    rule_file = tmp_path / "rules" / "attribution.yaml"
    text = rule_file.read_text(encoding="utf-8")
    rule = text.index("  - name: referral-converts")
    at = text.index("      - set_stage:", rule)
    rule_file.write_text(text[:at] + "      - set_stagee:" + text[at + 18:], encoding="utf-8")
    result = linkcrm(["validate", "rules/"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == shown


def test_the_eval_transcripts_are_exact() -> None:
    text = section("The rule language")
    transcripts = [b for b in blocks(text, "sh") if b.startswith("$ linkcrm eval")]
    assert transcripts, "the README shows no linkcrm eval transcript"
    checked = 0
    for block in transcripts:
        for chunk in block.split("$ ")[1:]:
            command, _, expected = chunk.partition("\n")
            if "|" in command:
                continue  # the piped example is run below
            args = shlex.split(command)
            assert args[0] == "linkcrm"
            result = linkcrm(args[1:])
            assert result.stdout == expected, command
            assert result.returncode == (1 if "error:" in expected else 0)
            checked += 1
    assert checked >= 2


def test_the_piped_eval_example_reads_export_lines() -> None:
    (piped,) = [line for b in blocks(section("The rule language"), "sh")
                for line in b.splitlines() if "| linkcrm eval" in line]
    args = shlex.split(piped.split("| ", 1)[1])
    lines = [{"id": 1, "received_at": "2026-03-01T00:00:00Z",
              "envelope": {"event": "referral.created", "data": {"referrer_id": "partner-9"}}},
             {"id": 2, "received_at": "2026-03-01T00:00:00Z",
              "envelope": {"event": "install.tracked", "data": {}}}]
    result = linkcrm(args[1:], stdin="".join(json.dumps(line) + "\n" for line in lines))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line 1: true  (boolean)\nline 2: false  (boolean)\n"


def test_the_five_minute_commands_for_eval_and_schema_work(tmp_path: Path) -> None:
    (block,) = blocks(section("Rules in five minutes"), "sh")
    shutil.copytree(RULES, tmp_path / "rules")
    shutil.copy(RULES / "events" / "referral_completed_b.json", tmp_path / "event.json")
    ran = 0
    for line in block.splitlines():
        command = line.split("  #", 1)[0].strip()
        if command.startswith(("linkcrm eval", "linkcrm schema")):
            result = linkcrm(shlex.split(command)[1:], cwd=tmp_path)
            assert result.returncode == 0, (command, result.stderr)
            ran += 1
    assert ran == 2
    assert (tmp_path / "rules" / "rules.schema.json").is_file()


def test_the_editor_setup_underlines_a_misspelt_field(tmp_path: Path) -> None:
    text = section("The rule language")
    assert "linkcrm schema rules/" in text
    (modeline,) = [b.strip() for b in blocks(text, "yaml") if "yaml-language-server" in b]
    shutil.copytree(RULES, tmp_path / "rules")
    assert linkcrm(["schema", "rules/"], cwd=tmp_path).returncode == 0
    rule_file = tmp_path / "rules" / "attribution.yaml"
    body = rule_file.read_text(encoding="utf-8").split("\n", 1)[1]
    rule_file.write_text(modeline + "\n" + body, encoding="utf-8")
    schema_name = modeline.split("$schema=", 1)[1]
    schema = json.loads((rule_file.parent / schema_name).read_text(encoding="utf-8"))
    validator = Draft202012Validator(schema)
    assert list(validator.iter_errors(load_yaml(rule_file.read_text(), "a").data)) == []
    misspelt = rule_file.read_text(encoding="utf-8").replace(
        "first_touch_campaign:", "first_touch_campain:", 1)
    assert list(validator.iter_errors(load_yaml(misspelt, "a").data)) != []
    assert linkcrm(["validate", "--strict", "rules/"], cwd=tmp_path).returncode == 0


def test_no_example_pins_a_tag_that_does_not_exist() -> None:
    tags = subprocess.run(["git", "tag"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()
    pinned = re.findall(r"linkcrm@([\w.-]+)", README) + re.findall(r"rev: ([\w.-]+)", README)
    assert pinned, "the README shows no install or pre-commit pin"
    for ref in pinned:
        assert ref == "main" or ref in tags, f"the README pins {ref!r}, which is not a tag"


def test_the_ci_example_fails_on_warnings() -> None:
    text = section("Checking rules in your CI and pre-commit")
    workflow = yaml.safe_load(next(b for b in blocks(text, "yaml") if "workflows" in b))
    runs = [step.get("run", "") for step in workflow["jobs"]["rules"]["steps"]]
    assert any(run.startswith("linkcrm validate --strict") for run in runs)
