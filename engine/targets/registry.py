"""Which targets a worker applies actions to, chosen and built from the environment."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from engine.config.fieldmap import FieldMap
from engine.errors import ConfigError, Location, PermanentCRMError, Problem, RetryableCRMError
from engine.storage import IdentityMap, LocalCRMStore, RateLimits, Storage
from engine.targets.base import CredentialsRefused, Target, startable
from engine.targets.credentials import HubSpotSettings, PipedriveSettings, SalesforceEnvironment
from engine.targets.http import body_of
from engine.targets.hubspot.api import hubspot_message
from engine.targets.hubspot.target import HubSpotTarget
from engine.targets.local.target import LocalTarget
from engine.targets.pipedrive.fields import PipedriveSetupError
from engine.targets.pipedrive.target import PipedriveTarget
from engine.targets.salesforce.target import SalesforceTarget

TARGETS_VARIABLE = "LINKCRM_TARGETS"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetContext:
    """What a factory may use: the environment (credentials, base URL overrides), the stores
    a target may be given (identity map and deal keys, shared rate limits, the embedded CRM),
    the field map and the shared HTTP client."""

    environ: Mapping[str, str]
    identities: IdentityMap
    rate_limits: RateLimits
    local_crm: LocalCRMStore
    field_map: FieldMap
    client: httpx.AsyncClient


Factory = Callable[[TargetContext], Target]
# Problems with a target's settings beyond their presence (a malformed URL, an unreadable key).
Check = Callable[[Mapping[str, str]], object]


@dataclass(frozen=True)
class TargetSpec:
    """A target's credentials and its factory (None: not wired in yet).

    `credentials` must all be set, or all of one of the `alternatives` (Salesforce: client
    credentials or JWT bearer); `check` raises ConfigError for settings that are present but
    wrong, so `linkcrm serve` refuses them before it binds its port.
    """

    credentials: tuple[str, ...]
    factory: Factory | None
    alternatives: tuple[tuple[str, ...], ...] = ()
    check: Check | None = None

    def credential_sets(self) -> tuple[tuple[str, ...], ...]:
        return (self.credentials, *self.alternatives)

    def configured(self, environ: Mapping[str, str]) -> bool:
        return bool(self.credentials) and any(
            all(_set(environ, v) for v in names) for names in self.credential_sets())

    def touched(self, environ: Mapping[str, str]) -> bool:
        return any(_set(environ, v) for names in self.credential_sets() for v in names)

    def missing(self, environ: Mapping[str, str]) -> list[str]:
        """What the nearest complete set still lacks: the fewest missing, then the set the
        user went furthest with (SF_USERNAME set: JWT bearer), then the first."""
        gaps = [([v for v in names if not _set(environ, v)], len(names))
                for names in self.credential_sets()]
        return min(gaps, key=lambda gap: (len(gap[0]), len(gap[0]) - gap[1]))[0]

    def hint(self, missing: list[str], name: str) -> str:
        others = [" + ".join(names) for names in self.alternatives]
        return f"export {missing[0]}=..." + "".join(f"; or set {o}" for o in others) + \
            f" (or leave {name} out of {TARGETS_VARIABLE})"


def _local(context: TargetContext) -> Target:
    return LocalTarget(context.local_crm, context.field_map)


def _hubspot(context: TargetContext) -> Target:
    settings = HubSpotSettings.from_env(context.environ)
    return HubSpotTarget(context.client, settings.token, context.field_map, context.identities,
                         context.rate_limits, base_url=settings.base_url,
                         requests_per_window=settings.rate_limit)


def _salesforce(context: TargetContext) -> Target:
    found = SalesforceEnvironment.from_env(context.environ)
    return SalesforceTarget.from_settings(context.client, found.settings, context.field_map,
                                          context.identities, context.rate_limits,
                                          limit_backoff=found.limit_backoff)


def _pipedrive(context: TargetContext) -> Target:
    settings = PipedriveSettings.from_env(context.environ)
    return PipedriveTarget(context.client, api_token=settings.api_token,
                           domain=settings.domain, base_url=settings.base_url,
                           burst_limit=settings.rate_limit, field_map=context.field_map,
                           identities=context.identities, rate_limits=context.rate_limits)


_SF_JWT = ("SF_INSTANCE_URL", "SF_CLIENT_ID", "SF_USERNAME")

# The registry: target name -> credentials and factory. A target whose factory is None can be
# named but refuses to start with a clear message (tests plug fakes in the same way).
REGISTRY: dict[str, TargetSpec] = {
    "local": TargetSpec((), _local),
    "hubspot": TargetSpec(("HUBSPOT_ACCESS_TOKEN",), _hubspot,
                          check=HubSpotSettings.from_env),
    "salesforce": TargetSpec(("SF_INSTANCE_URL", "SF_CLIENT_ID", "SF_CLIENT_SECRET"),
                             _salesforce,
                             alternatives=((*_SF_JWT, "SF_PRIVATE_KEY_FILE"),
                                           (*_SF_JWT, "SF_PRIVATE_KEY")),
                             check=SalesforceEnvironment.from_env),
    "pipedrive": TargetSpec(("PIPEDRIVE_API_TOKEN", "PIPEDRIVE_DOMAIN"), _pipedrive,
                            check=PipedriveSettings.from_env),
}


def select_targets(
    environ: Mapping[str, str], registry: Mapping[str, TargetSpec] = REGISTRY
) -> list[str]:
    """The names of the targets the environment selects, in a stable order.

    `LINKCRM_TARGETS=local,hubspot` names them explicitly (each CRM needs its credentials).
    Without it, every CRM whose credentials are set is used, and `local` when none is.
    Raises ConfigError naming every unknown target, missing credential and malformed setting
    at once, so `linkcrm serve` can refuse to start before it binds its port.
    """
    names, problems = _chosen(environ, registry)
    for name in names:
        spec = registry[name]
        if spec.credentials and not spec.configured(environ):
            missing = spec.missing(environ)
            problems.append(_problem("missing-credentials",
                                     f"target {name!r} needs {', '.join(missing)}",
                                     spec.hint(missing, name)))
        elif spec.factory is None:
            problems.append(_problem(
                "target-unavailable",
                f"target {name!r} is not available in this build of linkcrm",
                f"use {TARGETS_VARIABLE}=local, or an adapter that is wired into "
                "engine.targets.registry.REGISTRY",
            ))
        elif spec.check is not None:
            try:
                spec.check(environ)
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
    registry: Mapping[str, TargetSpec] = REGISTRY,
) -> list[Target]:
    """Build the targets `select_targets` names; they share `client` (the caller closes it).

        targets = build_targets(os.environ, storage, ruleset.field_map, client)
        await start_targets(targets)
    """
    context = TargetContext(environ, storage.identities, storage.rate_limits, storage.local_crm,
                            field_map, client)
    built: list[Target] = []
    for name in select_targets(environ, registry):
        factory = registry[name].factory
        assert factory is not None  # select_targets refuses targets without one
        built.append(factory(context))
    return built


async def _check_hubspot(target: Target) -> None:
    """One read with the token (the contact properties: the scopes linkcrm needs): a 401 or
    403 is CredentialsRefused; an outage is a RetryableCRMError."""
    if not isinstance(target, HubSpotTarget):
        return  # a stand-in under that name has no credentials to check
    response = await target.api.call("GET", "/crm/v3/properties/contacts",
                                     expect=(200, 401, 403))
    words = hubspot_message(body_of(response))
    if response.status_code == 401:
        raise CredentialsRefused(f"hubspot: the access token was refused (401: {words}); set "
                                 "HUBSPOT_ACCESS_TOKEN to a private-app token of this account")
    if response.status_code == 403:
        raise CredentialsRefused(f"hubspot: the access token lacks a scope (403: {words}); "
                                 "give the private app read and write on contacts, deals and "
                                 "their schemas (crm.objects.* and crm.schemas.*)")


# Start-up checks of targets without a start() of their own.
CHECKS: dict[str, Callable[[Target], Awaitable[None]]] = {"hubspot": _check_hubspot}


async def start_targets(targets: Sequence[Target]) -> None:
    """Run each target's start-up, which checks its credentials: Pipedrive resolves its field
    labels to keys, Salesforce gets a token, HubSpot reads its contact properties.

    Refused credentials raise ConfigError with a `credentials-refused` problem per target; a
    CRM that is not set up for the field map one problem per gap with its fix (`linkcrm
    provision pipedrive`, ...). A CRM that cannot be reached or answers with a server error
    right now says nothing about the credentials: that is logged as such and the target
    starts at its first action, so an outage never stops the service."""
    problems: list[Problem] = []
    for target in targets:
        check = CHECKS.get(target.name)
        if not startable(target) and check is None:
            continue
        try:
            if startable(target):
                await target.start()
            elif check is not None:
                await check(target)
        except RetryableCRMError as error:
            log.warning(f"{target.name} cannot be reached at start-up, so its credentials are "
                        f"not checked yet ({error}); starting anyway: its actions retry until "
                        "it answers", extra={"target": target.name, "error": str(error)})
        except CredentialsRefused as error:
            problems.append(Problem(Location(target.name), "credentials-refused", str(error),
                                    f"fix the {target.name} credentials, then start again "
                                    f"(`linkcrm doctor {target.name}` checks them)"))
        except PipedriveSetupError as error:
            problems.extend(Problem(Location(target.name), "target-not-set-up", p.message,
                                    p.fix) for p in error.problems)
        except PermanentCRMError as error:
            problems.append(Problem(Location(target.name), "target-refused", str(error),
                                    f"run `linkcrm doctor {target.name}` to see what to fix"))
    if problems:
        raise ConfigError(problems)


def _chosen(
    environ: Mapping[str, str], registry: Mapping[str, TargetSpec]
) -> tuple[list[str], list[Problem]]:
    raw = environ.get(TARGETS_VARIABLE, "").strip()
    if not raw:
        configured = [name for name, spec in registry.items() if spec.configured(environ)]
        problems = [
            _problem("missing-credentials",
                     f"{name} credentials are incomplete: {', '.join(missing)} not set",
                     f"set {', '.join(missing)}, or unset the other {name} variables")
            for name, spec in registry.items()
            if spec.credentials and name not in configured and spec.touched(environ)
            for missing in [spec.missing(environ)]
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
