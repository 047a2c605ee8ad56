"""Benchmark: drain a backlog of the shipped story through HubSpotTarget.execute_many against
the emulator enforcing HubSpot's limit over real HTTP, and compare with the limit-bound minimum.

    python tests/benchmarks/bench_hubspot.py --events 10000  # 100 requests / 10 s, 20 ms latency
    python tests/benchmarks/bench_hubspot.py --events 2000 --chunk 200

Each token's story is install -> referral sign-up -> conversion -> identify, interleaved with
other tokens' stories as a real backlog is. The worker hands the target `--chunk` events at a
time; the minimum time is the requests that batching needs (every batch read that set_once and
forward-only stages need included) divided by the limit's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from typing import Any

import httpx

from tests.support.paths import REPO

ROOT = REPO
sys.path.insert(0, str(ROOT))

from engine.actions import Action  # noqa: E402
from engine.errors import RetryableCRMError  # noqa: E402
from engine.rules.evaluator import plan  # noqa: E402
from engine.rules.files import load_ruleset  # noqa: E402
from engine.storage import open_storage  # noqa: E402
from engine.targets.base import CallContext  # noqa: E402
from engine.targets.hubspot.admin import provision  # noqa: E402
from engine.targets.hubspot.target import HubSpotTarget  # noqa: E402
from tests.emulators.hubspot import create_hubspot_emulator  # noqa: E402
from tests.emulators.server import serve  # noqa: E402

TOKEN = "pat-bench"


def backlog(events: int) -> list[dict[str, Any]]:
    """`events` events, four per token, each token's steps spread through the backlog."""
    tokens = max(1, events // 4)
    spread = max(1, tokens // 4)
    timeline = []
    for index in range(tokens):
        token = f"tok_{index:06}"
        steps = [
            {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
             "data": {"token": token, "prefix": "invite", "campaign": "spring",
                      "platform": "android"}},
            {"event": "referral.created", "timestamp": "2026-03-05T09:00:00Z",
             "data": {"token": token, "referrer_token": "tok_alice"}},
            {"event": "referral.completed", "timestamp": "2026-03-20T08:15:00Z",
             "data": {"token": token, "referrer_token": "tok_alice"}},
            {"event": "app.user_identified", "timestamp": "2026-03-20T09:00:00Z",
             "data": {"token": token, "email": f"{token}@example.com", "first_name": "Ada",
                      "last_name": "Lovelace", "user_id": f"user_{index}"}},
        ]
        timeline += [(index + step * spread, step, event) for step, event in enumerate(steps)]
    timeline.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in timeline[:events]]


async def main(args: argparse.Namespace) -> int:
    ruleset = load_ruleset([ROOT / "rules"])
    app, state = create_hubspot_emulator(TOKEN, rate_limit=args.limit,
                                         window_seconds=args.window, latency=args.latency)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as setup:
        await provision(setup, TOKEN, ruleset.field_map, base_url="http://hubspot")
    state.forget_requests()
    state.latency = args.latency

    events = backlog(args.events)
    chunks: list[list[tuple[Action, CallContext]]] = []
    for start in range(0, len(events), args.chunk):
        items = []
        for number, event in enumerate(events[start:start + args.chunk], start):
            items += [(a, CallContext(f"{number}:{i}"))
                      for i, a in enumerate(plan(event, ruleset).actions)]
        chunks.append(items)
    actions = sum(len(c) for c in chunks)

    with tempfile.TemporaryDirectory() as folder, serve(app) as url:
        storage = open_storage(f"sqlite:///{folder}/bench.db")
        await storage.migrate()
        async with httpx.AsyncClient(timeout=30) as client:
            target = HubSpotTarget(client, TOKEN, ruleset.field_map, storage.identities,
                                   storage.rate_limits,
                                   base_url=url, requests_per_window=args.limit,
                                   window_seconds=args.window)
            started = time.monotonic()
            failed = 0
            for pending in chunks:
                while pending:
                    results = await target.execute_many(pending)
                    retry = [item for item, r in zip(pending, results, strict=True)
                             if isinstance(r, RetryableCRMError)]
                    failed += sum(1 for r in results if isinstance(r, Exception)
                                  and not isinstance(r, RetryableCRMError))
                    pending = retry
            elapsed = time.monotonic() - started
        await storage.close()

    sent = sum(state.requests.values())
    needed = sent - state.throttled
    rate = args.limit / args.window
    minimum = needed / rate
    late = [t for t in state.throttled_at
            if state.first_request_at is not None and t > state.first_request_at + args.window]
    contacts, deals = len(state.contacts.records), len(state.deals.records)
    floor = 2 * math.ceil(contacts / 100) + 2 * math.ceil(deals / 100)
    print(f"events {len(events)}  actions {actions}  chunk {args.chunk} events  "
          f"limit {args.limit}/{args.window:g}s  latency {args.latency * 1000:.0f} ms")
    print(f"drained in {elapsed:.1f} s  ({len(events) / elapsed:.0f} events/s)  "
          f"failed actions {failed}")
    print("requests by kind:")
    for kind, count in sorted(state.requests.items(), key=lambda kv: -kv[1]):
        print(f"  {count:6}  {kind}")
    print(f"requests sent {sent}  429s {state.throttled} (after the first window: {len(late)})")
    print(f"limit-bound minimum: {needed} requests / {rate:g} per s = {minimum:.1f} s  "
          f"-> drain / minimum = {elapsed / minimum:.3f}")
    print(f"result: {contacts} contacts, {deals} deals, {len(state.associations)} associations;"
          f" one-batch floor for this backlog (all events in one call): {floor} requests "
          f"= {floor / rate:.1f} s")
    ok = not late and failed == 0 and elapsed <= 1.2 * minimum
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=100, help="events per execute_many call")
    parser.add_argument("--limit", type=int, default=100, help="requests per window")
    parser.add_argument("--window", type=float, default=10.0, help="window in seconds")
    parser.add_argument("--latency", type=float, default=0.02, help="emulator latency (s)")
    sys.exit(asyncio.run(main(parser.parse_args())))
