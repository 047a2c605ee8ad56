"""The README's rules-repository CI workflow, end to end: its export command where the
database is, then every `run:` step of its pull-request workflow in a real git repository
(a bare `origin` with `main`, a pull-request branch checked out), except the two that need the
internet (installing linkcrm, which this venv has, and posting the comment, whose file is
checked instead); then, once the pull request is merged, the `publish` job's steps against
the database (a SQLite file standing in for the production URL secret)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from engine.rules.versions import collect
from tests.support.diff_story import RULES, record, recorded_story
from tests.support.service_process import ROOT, service_env

README = (ROOT / "README.md").read_text(encoding="utf-8")
NEEDS_THE_INTERNET = ("pip install ", "gh pr comment ")

# The pull request: the identify rule stops writing the full name; its tests follow.
PULL_REQUEST = {
    "attribution.yaml": [("            name: join(' ', [data.first_name, data.last_name][?@])\n",
                          "")],
    "attribution_test.yaml": [
        ("                name: Alice Liddell, app_user_id: u_1}",
         "                app_user_id: u_1}"),
        ("set: {email: dave@example.com, first_name: Dave, name: Dave}",
         "set: {email: dave@example.com, first_name: Dave}")],
}


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def workflow_steps(job: str = "rules") -> list[dict[str, Any]]:
    text = section("Checking rules in your CI and pre-commit")
    block = re.search(r"```yaml\n(# \.github/workflows/rules\.yml\n.*?)```", text, re.DOTALL)
    assert block is not None, "the README shows no .github/workflows/rules.yml"
    workflow = yaml.safe_load(block.group(1))
    steps: list[dict[str, Any]] = workflow["jobs"][job]["steps"]
    return steps


def run_steps(steps: list[dict[str, Any]], repo: Path, env: dict[str, str],
              secrets: dict[str, str]) -> tuple[list[list[str]], list[list[str]]]:
    """Run each `run:` step in `repo` with its `env:` (`${{ secrets.X }}` from `secrets`);
    returns the steps skipped (they need the internet) and the ones run, by first words."""
    skipped, ran = [], []
    for step in steps:
        command = step.get("run")
        if command is None:
            continue  # `uses:` steps: the checkout, this Python
        if command.startswith(NEEDS_THE_INTERNET):
            skipped.append(command.split(" ")[:2])
            continue
        step_env = dict(env)
        for name, value in (step.get("env") or {}).items():
            secret = re.fullmatch(r"\$\{\{ secrets\.(\w+) \}\}", str(value))
            step_env[name] = secrets[secret.group(1)] if secret else str(value)
        done = sh(command, repo, step_env)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        ran.append(command.split(" ")[:2])
    return skipped, ran


def export_command() -> str:
    text = section("Checking rules in your CI and pre-commit")
    commands = [line for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
                for line in block.splitlines() if line.startswith("linkcrm events export")]
    assert len(commands) == 1, commands
    return commands[0]


def sh(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def git(cwd: Path, env: dict[str, str], *args: str) -> None:
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def edit(folder: Path, changes: dict[str, list[tuple[str, str]]]) -> None:
    for name, pairs in changes.items():
        path = folder / name
        text = path.read_text(encoding="utf-8")
        for old, new in pairs:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")


def test_the_readme_pull_request_workflow_runs_end_to_end(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                "HOME": str(tmp_path), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x",
                "GIT_CONFIG_NOSYSTEM": "1"})
    # Where linkcrm runs: the database has recorded the story; the README's export command.
    record(Path(env["LINKCRM_DATABASE_URL"].removeprefix("sqlite:///")), recorded_story())
    secrets = {"LINKCRM_DATABASE_URL": env["LINKCRM_DATABASE_URL"]}
    production = tmp_path / "production"
    production.mkdir()
    exported = sh(export_command(), production, env)
    assert exported.returncode == 0, exported.stderr
    # The rules repository: main holds the shipped rules and the exported events.
    origin, repo = tmp_path / "origin.git", tmp_path / "repo"
    git(tmp_path, env, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp_path, env, "clone", "-q", f"file://{origin}", str(repo))
    git(repo, env, "checkout", "-q", "-b", "main")
    shutil.copytree(RULES, repo / "rules")
    shutil.copytree(production / "recorded", repo / "recorded")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-q", "-m", "rules and recorded events")
    git(repo, env, "push", "-q", "origin", "main")
    git(repo, env, "checkout", "-q", "-b", "stop-writing-the-full-name")
    edit(repo / "rules", PULL_REQUEST)
    git(repo, env, "commit", "-q", "-am", "the full name is the CRM's job")
    # The workflow, step by step (the GitHub token is not needed without `gh`).
    production_url = env.pop("LINKCRM_DATABASE_URL")
    skipped, ran = run_steps(workflow_steps(), repo, env, {})
    assert skipped == [["pip", "install"], ["gh", "pr"]]
    assert [linkcrm for linkcrm in ran if linkcrm[0] == "linkcrm"] == [
        ["linkcrm", "validate"], ["linkcrm", "test"], ["linkcrm", "diff"]]
    comment = (repo / "diff.md").read_text(encoding="utf-8")
    assert comment.startswith("### linkcrm diff: <code>../main/rules</code> → "
                              "<code>rules/</code>\n")
    assert "**1 of 5 events plan differently** (events from recorded/events.jsonl;" in comment
    assert "| app-identifies-user | upsert_contact | set.name | no longer written | 1 |" \
        in comment
    assert "recorded/events.jsonl:1 (app.user_identified; deep_link_token=ref_sample_sam, " \
        "email=user-" in comment
    assert "sam.sample" not in comment and "Sam Sample" not in comment  # redacted

    # Merged: main is the pull request's head, and the publish job runs on it.
    git(repo, env, "checkout", "-q", "main")
    git(repo, env, "merge", "-q", "--ff-only", "stop-writing-the-full-name")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    skipped, ran = run_steps(workflow_steps("publish"), repo, env, secrets)
    assert skipped == [["pip", "install"]]
    assert ran == [["linkcrm", "rules"]]
    listed = sh("linkcrm rules list --format json", repo,
                {**env, "LINKCRM_DATABASE_URL": production_url})
    assert listed.returncode == 0, listed.stderr
    [published] = json.loads(listed.stdout)
    assert published["status"] == "active"
    assert published["version"] == collect([repo / "rules"]).version
    assert published["label"] == head
