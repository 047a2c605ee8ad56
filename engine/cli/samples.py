"""`send-samples`: the first-run story, signed and posted to a running `linkcrm serve`."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import httpx

from engine.signing import sign

from .output import FORMAT_OPTION, emit_json, safe
from .params import http_url, not_blank, seconds
from .runtime import load_settings, require_secret


def story(token: str) -> list[dict[str, Any]]:
    """Install -> referral sign-up -> conversion for one referral link `token`. Fixed
    timestamps: sending the story twice sends the same bytes, which linkcrm deduplicates."""
    return [
        {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
         "data": {"token": token, "prefix": "invite", "campaign": "spring-referrals",
                  "platform": "iOS"}},
        {"event": "referral.created", "timestamp": "2026-03-01T12:41:00Z",
         "data": {"token": token, "referrer_token": "tok_alice",
                  "referred_user_id": "user_42", "campaign": "spring-referrals"}},
        {"event": "referral.completed", "timestamp": "2026-03-20T08:15:00Z",
         "data": {"token": token, "referrer_token": "tok_alice", "milestone": "first_purchase"}},
    ]


def identify_body(token: str) -> dict[str, Any]:
    return {"token": token, "email": "sam.sample@example.com", "first_name": "Sam",
            "last_name": "Sample", "user_id": "user_42"}


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@click.command("send-samples")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, callback=http_url,
              help="Where `linkcrm serve` listens.")
@click.option("--token", default="ref_sample_sam", show_default=True, callback=not_blank,
              help="The referral link token the story is about.")
@click.option("--wait", "wait_seconds", default=20.0, show_default=True, type=seconds(0, 3600),
              help="Seconds to wait for the server to come up (it may be starting).")
@FORMAT_OPTION
def send_samples(url: str, token: str, wait_seconds: float, output_format: str) -> None:
    """Sign (WEBHOOK_SECRET) and post the sample story to a running server: an install, a
    referral sign-up and a conversion, then an identify call when LINKCRM_API_KEYS is set.
    A few seconds later `linkcrm crm contacts` shows the contact, its stage history
    (lead -> customer) and `linkcrm crm deals` its deal. Exit 1 if a post fails.

    \b
    Example:
      linkcrm send-samples --url http://127.0.0.1:8000
      linkcrm crm contacts
    """
    settings = load_settings()
    require_secret(settings)
    secret = settings.webhook_secrets[0]
    base = url.rstrip("/")
    sent: list[dict[str, Any]] = []
    failed = False
    with httpx.Client(timeout=10.0) as client:
        _wait_until_ready(client, base, wait_seconds)
        requests = []
        for document in story(token):
            body = encode(document)
            requests.append((document["event"], client.build_request(
                "POST", f"{base}/webhooks/tolinku", content=body, headers={
                    "content-type": "application/json", "user-agent": "Tolinku/1.0",
                    "x-webhook-event": document["event"],
                    "x-webhook-signature": sign(body, secret)})))
        if settings.api_keys:
            requests.append(("app.user_identified", client.build_request(
                "POST", f"{base}/v1/identify", content=encode(identify_body(token)), headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {settings.api_keys[0]}"})))
        for event, request in requests:
            try:
                response = client.send(request)
            except httpx.TransportError as error:
                click.echo(f"error: cannot reach {base} ({type(error).__name__}); is "
                           "`linkcrm serve` running there?", err=True)
                sys.exit(1)
            try:
                answer = response.json()
            except ValueError:
                answer = None
            status = answer.get("status") if isinstance(answer, dict) else None
            sent.append({"event": event, "http_status": response.status_code,
                         "status": status, "id": answer.get("id") if status else None})
            failed |= response.status_code != 200
    if output_format == "json":
        emit_json(sent)
    else:
        for row in sent:
            outcome = (f"{safe(row['status'])} as event {safe(row['id'])}" if row["status"]
                       else "rejected")
            click.echo(f"{row['event']:<22} -> {row['http_status']} {outcome}")
        if not settings.api_keys:
            click.echo("(set LINKCRM_API_KEYS to also send the identify call)")
        if not failed:
            click.echo("now run: linkcrm crm contacts && linkcrm crm deals")
    refused = {row["event"] for row in sent if row["http_status"] == 401}
    if refused - {"app.user_identified"}:
        click.echo(f"error: the server at {base} refused the signature: it is not a `linkcrm "
                   "serve` started with this WEBHOOK_SECRET (another process may hold the port; "
                   "a second serve there exits with 'port ... is in use')", err=True)
    elif refused:
        click.echo(f"error: the server at {base} refused the API key of the identify call: "
                   "start it with the same LINKCRM_API_KEYS", err=True)
    elif failed:
        click.echo(f"error: the server at {base} refused a sample (the answers above say "
                   "which); `linkcrm events list` shows what it stored", err=True)
    sys.exit(1 if failed else 0)


def _wait_until_ready(client: httpx.Client, base: str, seconds: float) -> None:
    """Poll `/readyz` so that `linkcrm serve & linkcrm send-samples` works in one line."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline:
            return  # the first post then reports what is wrong
        time.sleep(0.2)
