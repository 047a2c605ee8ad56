"""A rule set's version: a content hash of its normalised files, and a label.

The files of a rule set are its rule files and its field map (rule tests are not part of what
runs, so they are left out). Each is named by its path relative to the folder given (a file
given on its own is named by its file name) and normalised: line endings become `\\n`,
trailing whitespace goes, and the text ends in exactly one newline. The version is the first
VERSION_LENGTH hex digits of the SHA-256 of those names and texts, so the same rules give the
same version on every machine, whatever the editor did to line endings.

The label says where the files came from: the git commit of their folder's work tree (with
`-dirty` when the folder has uncommitted changes), or whatever the publisher passed.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from engine.rules.files import FIELD_MAP_NAME, discover, load_ruleset
from engine.rules.model import RuleSet

VERSION_LENGTH = 12
VERSION_PATTERN = re.compile(rf"[0-9a-f]{{{VERSION_LENGTH}}}")
GIT_TIMEOUT = 5.0


class RuleFilesError(ValueError):
    """The paths do not make one rule set (no rule files, two files with one name)."""


@dataclass(frozen=True, slots=True)
class RuleSetFiles:
    """The normalised files of one rule set, by relative name, and their version."""

    files: Mapping[str, str]
    version: str


def normalise(text: str) -> str:
    """Line endings `\\n`, no trailing whitespace on a line, exactly one final newline."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def version_of(files: Mapping[str, str]) -> str:
    """The content hash of normalised files (names sorted, so order never matters)."""
    canonical = json.dumps(sorted((name, normalise(text)) for name, text in files.items()),
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:VERSION_LENGTH]


def from_files(files: Mapping[str, str]) -> RuleSetFiles:
    normalised = {name: normalise(text) for name, text in sorted(files.items())}
    return RuleSetFiles(normalised, version_of(normalised))


def _name(path: Path, roots: Sequence[Path]) -> str:
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def collect(paths: Sequence[str | Path]) -> RuleSetFiles:
    """The rule files and field map under `paths` (as `linkcrm validate` finds them), read,
    named and normalised. Raises RuleFilesError when there are no rule files or two files
    would get one name, OSError when a file cannot be read."""
    sources = discover(paths)
    if not sources.rule_files:
        raise RuleFilesError(
            "no rule files found under " + ", ".join(map(str, paths))
            + "; give the folder that holds the rule files (*.yaml) and fields.yaml")
    roots = [Path(p).resolve() for p in paths if Path(p).is_dir()]
    files: dict[str, str] = {}
    chosen = [*sources.rule_files, *([sources.field_map] if sources.field_map else [])]
    for path in chosen:
        resolved = path.resolve()
        name = FIELD_MAP_NAME if path == sources.field_map else _name(resolved, roots)
        if name in files:
            raise RuleFilesError(
                f"two rule files would both be stored as {name!r}; publish them from one "
                "folder, or rename one")
        files[name] = resolved.read_text(encoding="utf-8")
    return from_files(files)


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_label(paths: Sequence[str | Path]) -> str | None:
    """The commit the rules' folder is at, when it is in a git work tree (`-dirty` appended
    when it has uncommitted changes there); None otherwise or without git."""
    if not paths:
        return None
    first = Path(paths[0]).resolve()
    folder = first if first.is_dir() else first.parent
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None
    changes = _git(folder, "status", "--porcelain", "--", ".")
    return commit + ("-dirty" if changes else "")


def load_version(files: Mapping[str, str], version: str) -> RuleSet:
    """The rule set a published version's files make, written to a temporary folder and
    loaded as `linkcrm validate` loads a folder; its `version` set. Raises ConfigError (every
    problem) when the files do not load with this linkcrm, RuleFilesError when `version` is
    not their content hash (a damaged copy)."""
    if version_of(files) != version:
        raise RuleFilesError(
            f"the stored files of rule version {version} do not hash to it; publish the "
            "rules again")
    with tempfile.TemporaryDirectory(prefix="linkcrm-rules-") as folder:
        root = Path(folder)
        for name, text in files.items():
            path = (root / name).resolve()
            if not path.is_relative_to(root.resolve()) or path == root.resolve():
                raise RuleFilesError(f"rule version {version} names a file outside its "
                                     f"folder ({name!r}); publish the rules again")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        ruleset = load_ruleset([root])
    return replace(ruleset, version=version)
