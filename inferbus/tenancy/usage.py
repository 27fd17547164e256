"""``inferbus status --by-user``: what each user used of each model, from the workers' $SRV.STATS.

Each worker reports, per model version, ``data.users``: ``{"<user>": {"requests", "rows",
"compute_s", "refused"}}`` (docs/PROTOCOL.md, section 12); here they are summed over workers.
A user sees only their own row; an admin sees everyone's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from nats.aio.client import Client as NatsClient

from inferbus.contract import service_subject
from inferbus.pipeline.discovery import gather


@dataclass(slots=True)
class UserUsage:
    user: str
    requests: int = 0
    rows: int = 0
    compute_s: float = 0.0
    refused: int = 0

    def add(self, reported: Mapping[str, Any]) -> None:
        self.requests += int(reported.get("requests", 0))
        self.rows += int(reported.get("rows", 0))
        self.compute_s += float(reported.get("compute_s", 0.0))
        self.refused += int(reported.get("refused", 0))


#: per model version ("add v1"), one row per user
Usage = dict[str, list[UserUsage]]


def versioned_endpoint(endpoint: Mapping[str, Any]) -> str | None:
    """``<model> v<version>`` for a versioned endpoint (``inferbus.infer.<model>.<version>``);
    None for the unversioned one, which reports the same data again."""
    tokens = str(endpoint.get("subject", "")).split(".")
    if len(tokens) != 4 or not tokens[3].isdigit():
        return None
    return f"{tokens[2]} v{tokens[3]}"


def usage_by_user(stats: list[dict[str, Any]]) -> Usage:
    totals: dict[str, dict[str, UserUsage]] = {}
    for reply in stats:
        for endpoint in reply.get("endpoints") or []:
            model = versioned_endpoint(endpoint)
            data = endpoint.get("data")
            users = data.get("users") if isinstance(data, dict) else None
            if model is None or not isinstance(users, dict):
                continue
            rows = totals.setdefault(model, {})
            for user, reported in users.items():
                if isinstance(reported, dict):
                    rows.setdefault(user, UserUsage(str(user))).add(reported)
    return {model: sorted(rows.values(), key=lambda u: u.user)
            for model, rows in sorted(totals.items())}  # fmt: skip


async def snapshot(nats: NatsClient, timeout: float = 0.5) -> Usage:
    return usage_by_user(await gather(nats, service_subject("STATS"), timeout=timeout))


async def view(nats: NatsClient) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """What ``--by-user`` shows: the figures as JSON data, and as text."""
    usage = await snapshot(nats)
    return to_json(usage), render(usage)


def to_json(usage: Usage) -> dict[str, list[dict[str, Any]]]:
    return {model: [asdict(row) for row in rows] for model, rows in usage.items()}


def render(usage: Usage) -> str:
    if not usage:
        return "no per-user figures (no worker answered, or none runs with a roster)"
    lines: list[str] = []
    for model, rows in usage.items():
        lines += [
            model,
            f"  {'user':20} {'requests':>9} {'rows':>9} {'compute s':>10} {'refused':>8}",
        ]
        lines += [f"  {r.user[:20]:20} {r.requests:>9} {r.rows:>9} {r.compute_s:>10.3f} "
                  f"{r.refused:>8}" for r in rows]  # fmt: skip
        lines.append("")
    return "\n".join(lines).rstrip("\n")
