"""Which targets a worker applies actions to, chosen from the environment."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from engine.crm.base import Target
from engine.crm.local import LocalTarget
from engine.errors import ConfigError, Location, Problem
from engine.fieldmap import FieldMap
from engine.storage import Storage

TARGETS_VARIABLE = "LINKCRM_TARGETS"


@dataclass(frozen=True)
class TargetContext:
    """What a factory may use: the environment (credentials, base URL overrides), the storage
    (identity map, deal keys, shared rate limits), the field map and the shared HTTP client."""

    environ: Mapping[str, str]
    storage: Storage
    field_map: FieldMap
    client: httpx.AsyncClient


Factory = Callable[[TargetContext], Target]


@dataclass(frozen=True)
class TargetSpec:
    """A target's credentials (all required) and its factory (None: not wired in yet)."""

    credentials: tuple[str, ...]
    factory: Factory | None


def _local(context: TargetContext) -> Target:
    return LocalTarget(context.storage, context.field_map)


# ---------------------------------------------------------------------------------------------
# The registry: target name -> credentials and factory. The CRM adapters plug in here, e.g.
#     "hubspot": TargetSpec(("HUBSPOT_ACCESS_TOKEN",), _hubspot),
# with `_hubspot(context)` building `HubSpotTarget(context.client, ..., context.storage, ...)`.
# A target whose factory is None can be named but refuses to start with a clear message.
# ---------------------------------------------------------------------------------------------
REGISTRY: dict[str, TargetSpec] = {
    "local": TargetSpec((), _local),
    "hubspot": TargetSpec(("HUBSPOT_ACCESS_TOKEN",), None),
    "salesforce": TargetSpec(("SF_INSTANCE_URL", "SF_CLIENT_ID", "SF_CLIENT_SECRET"), None),
    "pipedrive": TargetSpec(("PIPEDRIVE_API_TOKEN", "PIPEDRIVE_DOMAIN"), None),
}


def select_targets(
    environ: Mapping[str, str], registry: Mapping[str, TargetSpec] = REGISTRY
) -> list[str]:
    """The names of the targets the environment selects, in a stable order.

    `LINKCRM_TARGETS=local,hubspot` names them explicitly (each CRM needs its credentials).
    Without it, every CRM whose credentials are all set is used, and `local` when none is.
    Raises ConfigError naming every unknown target and every missing credential at once, so
    `linkcrm serve` can refuse to start before it binds its port.
    """
    names, problems = _chosen(environ, registry)
    for name in names:
        spec = registry[name]
        missing = [variable for variable in spec.credentials if not _set(environ, variable)]
        if missing:
            problems.append(_problem(
                "missing-credentials",
                f"target {name!r} needs {', '.join(missing)}",
                f"export {missing[0]}=... (or leave {name} out of {TARGETS_VARIABLE})",
            ))
        elif spec.factory is None:
            problems.append(_problem(
                "target-unavailable",
                f"target {name!r} is not available in this build of linkcrm",
                f"use {TARGETS_VARIABLE}=local, or an adapter that is wired into "
                "engine.crm.targets.REGISTRY",
            ))
    if problems:
        raise ConfigError(problems)
    return names


def build_targets(
    environ: Mapping[str, str],
    storage: Storage,
    field_map: FieldMap,
    client: httpx.AsyncClient,
    *,
    registry: Mapping[str, TargetSpec] = REGISTRY,
) -> list[Target]:
    """Build the targets `select_targets` names; they share `client` (the caller closes it).

        targets = build_targets(os.environ, storage, ruleset.field_map, client)
    """
    context = TargetContext(environ, storage, field_map, client)
    built: list[Target] = []
    for name in select_targets(environ, registry):
        factory = registry[name].factory
        assert factory is not None  # select_targets refuses targets without one
        built.append(factory(context))
    return built


def _chosen(
    environ: Mapping[str, str], registry: Mapping[str, TargetSpec]
) -> tuple[list[str], list[Problem]]:
    raw = environ.get(TARGETS_VARIABLE, "").strip()
    if not raw:
        configured = [
            name for name, spec in registry.items()
            if spec.credentials and all(_set(environ, v) for v in spec.credentials)
        ]
        partial = [
            (name, [v for v in spec.credentials if not _set(environ, v)])
            for name, spec in registry.items()
            if spec.credentials and name not in configured
            and any(_set(environ, v) for v in spec.credentials)
        ]
        problems = [
            _problem("missing-credentials",
                     f"{name} credentials are incomplete: {', '.join(missing)} not set",
                     f"set {', '.join(missing)}, or unset the other {name} variables")
            for name, missing in partial
        ]
        return (configured or ["local"]), problems
    names: list[str] = []
    problems = []
    for entry in raw.split(","):
        name = entry.strip().lower()
        if not name:
            continue
        if name not in registry:
            close = difflib.get_close_matches(name, list(registry), n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"the targets are {', '.join(registry)}")
            problems.append(_problem("unknown-target", f"unknown target {name!r} in "
                                     f"{TARGETS_VARIABLE}", hint))
        elif name not in names:
            names.append(name)
    if not names and not problems:
        problems.append(_problem("no-targets", f"{TARGETS_VARIABLE} names no target",
                                 f"e.g. {TARGETS_VARIABLE}=local"))
    return names, problems


def _set(environ: Mapping[str, str], variable: str) -> bool:
    return bool(environ.get(variable, "").strip())


def _problem(code: str, message: str, hint: str) -> Problem:
    return Problem(location=Location("environment"), code=code, message=message, hint=hint)
