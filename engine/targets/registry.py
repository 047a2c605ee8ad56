"""Which targets a worker applies actions to, chosen and built from the environment, and the
set-up commands (`provision`, `doctor`) of each CRM.

Every kind of target declares itself in its own package (`engine.targets.<kind>.kind.KIND`: its
credentials, how to build and start-check it, provision, doctor, field map dialect); this is the
one registry that names them.

    targets = build_targets(os.environ, storage, ruleset.field_map, client)
    await start_targets(targets)
    findings = await doctor("pipedrive", os.environ, field_map, client)   # [] when ready
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence

import httpx

from engine.config.fieldmap import Dialect, FieldMap
from engine.errors import ConfigError, Location, PermanentCRMError, Problem, RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CredentialsRefused, Target
from engine.targets.hubspot.kind import KIND as HUBSPOT
from engine.targets.kind import (
    Environ,
    Finding,
    NotSetUp,
    Provisioned,
    TargetContext,
    TargetKind,
    start_itself,
)
from engine.targets.local.kind import KIND as LOCAL
from engine.targets.pipedrive.kind import KIND as PIPEDRIVE
from engine.targets.salesforce.kind import KIND as SALESFORCE

__all__ = ["REGISTRY", "TARGETS_VARIABLE", "Finding", "Provisioned", "TargetContext",
           "TargetKind", "admin_targets", "build_targets", "dialect", "doctor", "provision",
           "select_targets", "start_targets"]

TARGETS_VARIABLE = "LINKCRM_TARGETS"
log = logging.getLogger(__name__)

# The registry: target name -> its kind. A kind whose `build` is None can be named but refuses
# to start with a clear message (tests plug fakes in the same way).
REGISTRY: dict[str, TargetKind] = {
    "local": LOCAL, "hubspot": HUBSPOT, "salesforce": SALESFORCE, "pipedrive": PIPEDRIVE}


def dialect(name: str, registry: Mapping[str, TargetKind] = REGISTRY) -> Dialect:
    """How target `name` reads the field map and writes values (`explain --target`)."""
    return registry[name].dialect


def select_targets(
    environ: Mapping[str, str], registry: Mapping[str, TargetKind] = REGISTRY
) -> list[str]:
    """The names of the targets the environment selects, in a stable order.

    `LINKCRM_TARGETS=local,hubspot` names them explicitly (each CRM needs its credentials).
    Without it, every CRM whose credentials are set is used, and `local` when none is.
    Raises ConfigError naming every unknown target, missing credential and malformed setting
    at once, so `linkcrm serve` can refuse to start before it binds its port.
    """
    names, problems = _chosen(environ, registry)
    for name in names:
        kind = registry[name]
        if kind.credentials and not kind.configured(environ):
            missing = kind.missing(environ)
            others = "".join(f"; or set {' + '.join(alternative)}"
                             for alternative in kind.alternatives)
            problems.append(_problem("missing-credentials",
                                     f"target {name!r} needs {', '.join(missing)}",
                                     f"export {missing[0]}=...{others} (or leave {name} out "
                                     f"of {TARGETS_VARIABLE})"))
        elif kind.build is None:
            problems.append(_problem(
                "target-unavailable",
                f"target {name!r} is not available in this build of linkcrm",
                f"use {TARGETS_VARIABLE}=local, or an adapter that is wired into "
                "engine.targets.registry.REGISTRY",
            ))
        elif kind.check is not None:
            try:
                kind.check(environ)
            except ConfigError as error:
                problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    return names


def build_targets(
    environ: Mapping[str, str],
    storage: Storage,
    field_map: FieldMap,
    client: httpx.AsyncClient,
    *,
    registry: Mapping[str, TargetKind] = REGISTRY,
) -> list[Target]:
    """Build the targets `select_targets` names; they share `client` (the caller closes it).

        targets = build_targets(os.environ, storage, ruleset.field_map, client)
        await start_targets(targets)
    """
    context = TargetContext(environ, storage.identities, storage.rate_limits, storage.local_crm,
                            field_map, client)
    built: list[Target] = []
    for name in select_targets(environ, registry):
        build = registry[name].build
        assert build is not None  # select_targets refuses targets without one
        built.append(build(context))
    return built


async def start_targets(targets: Sequence[Target],
                        registry: Mapping[str, TargetKind] = REGISTRY) -> None:
    """Run each target's start-up, which checks its credentials: Pipedrive resolves its field
    labels to keys, Salesforce gets a token, HubSpot reads its contact properties.

    Refused credentials raise ConfigError with a `credentials-refused` problem per target; a
    CRM that is not set up for the field map one problem per gap with its fix (`linkcrm
    provision pipedrive`, ...). A CRM that cannot be reached or answers with a server error
    right now says nothing about the credentials: that is logged as such and the target
    starts at its first action, so an outage never stops the service."""
    problems: list[Problem] = []
    for target in targets:
        kind = registry.get(target.name)
        try:
            await (kind.start if kind is not None else start_itself)(target)
        except RetryableCRMError as error:
            log.warning(f"{target.name} cannot be reached at start-up, so its credentials are "
                        f"not checked yet ({error}); starting anyway: its actions retry until "
                        "it answers", extra={"target": target.name, "error": str(error)})
        except CredentialsRefused as error:
            problems.append(Problem(Location(target.name), "credentials-refused", str(error),
                                    f"fix the {target.name} credentials, then start again "
                                    f"(`linkcrm doctor {target.name}` checks them)"))
        except NotSetUp as error:
            problems.extend(Problem(Location(target.name), "target-not-set-up", f.problem,
                                    f.fix) for f in error.findings)
        except PermanentCRMError as error:
            problems.append(Problem(Location(target.name), "target-refused", str(error),
                                    f"run `linkcrm doctor {target.name}` to see what to fix"))
    if problems:
        raise ConfigError(problems)


def admin_targets(registry: Mapping[str, TargetKind] = REGISTRY) -> list[str]:
    """The targets `linkcrm provision` and `linkcrm doctor` take: those with a CRM to set up."""
    return sorted(name for name, kind in registry.items()
                  if kind.provision is not None and kind.doctor is not None)


async def provision(target: str, environ: Environ, field_map: FieldMap,
                    client: httpx.AsyncClient) -> Provisioned:
    """Create what the field map needs in `target`'s CRM (idempotent), then check the rest.
    Missing or malformed credentials raise ConfigError; a CRM that refuses a change CRMError.
    Neither this nor `doctor` needs linkcrm's database: the few requests are not paced."""
    run = REGISTRY[target].provision
    assert run is not None, f"{target} has no CRM to provision"
    return await run(environ, field_map, client)


async def doctor(target: str, environ: Environ, field_map: FieldMap,
                 client: httpx.AsyncClient) -> list[Finding]:
    """Everything `target`'s CRM lacks for the field map, each with its fix; [] when ready."""
    run = REGISTRY[target].doctor
    assert run is not None, f"{target} has no CRM to check"
    return await run(environ, field_map, client)


def _chosen(
    environ: Mapping[str, str], registry: Mapping[str, TargetKind]
) -> tuple[list[str], list[Problem]]:
    raw = environ.get(TARGETS_VARIABLE, "").strip()
    if not raw:
        configured = [name for name, kind in registry.items() if kind.configured(environ)]
        problems = [
            _problem("missing-credentials",
                     f"{name} credentials are incomplete: {', '.join(missing)} not set",
                     f"set {', '.join(missing)}, or unset the other {name} variables")
            for name, kind in registry.items()
            if kind.credentials and name not in configured and kind.touched(environ)
            for missing in [kind.missing(environ)]
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


def _problem(code: str, message: str, hint: str) -> Problem:
    return Problem(location=Location("environment"), code=code, message=message, hint=hint)
