"""`linkcrm provision pipedrive` and `linkcrm doctor pipedrive`: create and check what the field
map needs in a Pipedrive account."""

from __future__ import annotations

import httpx

from engine.crm.pipedrive_api import PipedriveAPI, PipedriveAuthError, base_url_for
from engine.crm.pipedrive_fields import by_label, check, fetch_catalog, needs
from engine.errors import CRMError
from engine.fieldmap import FieldMap


class PipedriveAdmin:
    """Account set-up through API v2 (few requests: no shared pacing, 429s wait inline).

        admin = PipedriveAdmin(client, api_token=token, domain="acme")
        for line in await admin.provision(field_map): print(line)
        problems = await admin.doctor(field_map)     # [] when the account is ready
    """

    def __init__(self, client: httpx.AsyncClient, *, api_token: str, domain: str | None = None,
                 base_url: str | None = None) -> None:
        self._api = PipedriveAPI(client, api_token=api_token,
                                 base_url=base_url_for(domain, base_url))

    async def provision(self, field_map: FieldMap) -> list[str]:
        """Create the missing person and deal custom fields and the missing options of option
        fields; idempotent (a second run does nothing). Returns what was done. Pipelines and
        stages are not created: `doctor` names any that are missing."""
        catalog = await fetch_catalog(self._api)
        done: list[str] = []
        for need in needs(field_map):
            existing = by_label(catalog, need.entity).get(need.label, [])
            if not existing:
                body: dict[str, object] = {"field_name": need.label, "field_type": need.create_as}
                if need.options:
                    body["options"] = [{"label": option} for option in need.options]
                await self._api.post(f"/{need.entity}Fields", body)
                done.append(f"created {need.entity} field {need.label!r} ({need.create_as})")
                continue
            if len(existing) != 1 or existing[0].get("field_type") not in ("enum", "set"):
                continue  # duplicates and wrong types need a person's decision: see doctor
            have = {str(o.get("label")) for o in existing[0].get("options") or []}
            missing = [option for option in need.options if option not in have]
            if missing:
                await self._api.post(f"/{need.entity}Fields/{existing[0]['field_code']}/options",
                                     [{"label": option} for option in missing])
                done.append(f"added option(s) {', '.join(map(repr, missing))} to "
                            f"{need.entity} field {need.label!r}")
        return done

    async def doctor(self, field_map: FieldMap) -> list[str]:
        """Every problem with its fix: the token works; each label exists once with a
        compatible (and, for identities, searchable) type; option fields hold the stage and
        enum options; the pipeline and its stages exist. An empty list means ready."""
        try:
            catalog = await fetch_catalog(self._api)
        except PipedriveAuthError as error:
            return [f"the API token was refused ({error}); fix: set PIPEDRIVE_API_TOKEN to a "
                    "valid token (Pipedrive: Personal preferences > API)"]
        except CRMError as error:
            return [f"Pipedrive could not be read ({error}); fix: check PIPEDRIVE_DOMAIN (or "
                    "the base URL), the network, and that the token's user is an admin"]
        _, problems = check(field_map, catalog)
        return [str(problem) for problem in problems]
