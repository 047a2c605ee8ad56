"""`linkcrm provision pipedrive` and `linkcrm doctor pipedrive`: create and check what the field
map needs in a Pipedrive account (custom fields, their options, the deal pipeline, its stages)."""

from __future__ import annotations

import httpx

from engine.config.fieldmap import FieldMap
from engine.errors import CRMError
from engine.targets.kind import Finding
from engine.targets.pipedrive.api import PipedriveAPI, PipedriveAuthError, Record, base_url_for
from engine.targets.pipedrive.fields import Catalog, by_label, check, fetch_catalog, needs

CRM = "pipedrive"
DEFAULT_PIPELINE = "Pipeline"  # the name Pipedrive gives an account's first pipeline


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
        """Create the missing person and deal custom fields, the missing options of option
        fields, the deal pipeline and the stages the field map names; idempotent (a second run
        creates nothing). Returns what was created, and the pipeline and stages found."""
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
        return done + await self._pipeline(field_map, catalog)

    async def _pipeline(self, field_map: FieldMap, catalog: Catalog) -> list[str]:
        """The field map's deal pipeline (by name; the account's first one when the field map
        names none) and its stages (by name, in the field map's order, after any it has)."""
        wanted = field_map.deal_pipeline.get(CRM)
        names = list(dict.fromkeys(s.value(CRM) for s in field_map.deal_stages if s.value(CRM)))
        live = [p for p in catalog.pipelines if not p.get("is_deleted")]
        if wanted is None and not names:
            return []
        if wanted is None:
            pipeline: Record | None = live[0] if live else None
            name = str(pipeline["name"]) if pipeline else DEFAULT_PIPELINE
        else:
            name = wanted.name
            pipeline = next((p for p in live if p.get("name") == name), None)
        if pipeline is None:
            pipeline = (await self._api.post("/pipelines", {"name": name}))["data"]
            assert isinstance(pipeline, dict)
            report = [f"created pipeline {name!r}"]
            # A new pipeline may come with stages of its own: read what it has.
            stages = await self._api.get_all("/stages", {"pipeline_id": int(pipeline["id"])})
        else:
            report = [f"pipeline {name!r}: already exists"]
            stages = catalog.stages
        have = {str(s.get("name")) for s in stages
                if s.get("pipeline_id") == pipeline["id"] and not s.get("is_deleted")}
        found = [stage for stage in names if stage in have]
        if found:
            report.append(f"stage(s) {', '.join(map(repr, found))} of pipeline {name!r}: "
                          "already exist")
        missing = [stage for stage in names if stage not in have]
        for stage in missing:
            await self._api.post("/stages", {"name": stage, "pipeline_id": int(pipeline["id"])})
        if missing:
            report.append(f"created stage(s) {', '.join(map(repr, missing))} in pipeline "
                          f"{name!r}")
        return report

    async def doctor(self, field_map: FieldMap) -> list[Finding]:
        """Every problem with its fix: the token works; each label exists once with a
        compatible (and, for identities, searchable) type; option fields hold the stage and
        enum options; the pipeline and its stages exist. An empty list means ready."""
        try:
            catalog = await fetch_catalog(self._api)
        except PipedriveAuthError as error:
            return [Finding(f"the API token was refused ({error})", "set PIPEDRIVE_API_TOKEN "
                            "to a valid token (Pipedrive: Personal preferences > API)")]
        except CRMError as error:
            return [Finding(f"Pipedrive could not be read ({error})", "check PIPEDRIVE_DOMAIN "
                            "(or the base URL), the network, and that the token's user is an "
                            "admin")]
        _, problems = check(field_map, catalog)
        return problems
