"""``inferbus roster check``: a roster in a few lines, for a person to read before applying it."""

from __future__ import annotations

from inferbus.roster import Quota, Roster


def _quota(quota: Quota) -> str:
    if not quota.limited:
        return "no quota"
    parts = []
    if quota.rate is not None:
        parts.append(f"{quota.rate:g} req/s (burst {quota.burst})")
    if quota.rows_in_flight is not None:
        parts.append(f"{quota.rows_in_flight} rows in flight")
    return ", ".join(parts)


def _groups(roster: Roster) -> str:
    members: dict[str, list[str]] = {}
    for user in roster.users.values():
        for group in user.groups:
            members.setdefault(group, []).append(user.name)
    return ", ".join(f"{group} ({len(names)} member{'s' * (len(names) != 1)})"
                     for group, names in sorted(members.items()))  # fmt: skip


def describe(roster: Roster) -> str:
    """Who is in the roster, what each user may call, and how much."""
    lines = [
        f"admins:  {', '.join(roster.admins) or '(none)'}",
        f"workers: {', '.join(roster.workers) or '(none)'}",
        f"groups:  {_groups(roster) or '(none)'}",
        f"users:   {len(roster.users)}",
    ]
    for user in sorted(roster.users.values(), key=lambda u: u.name):
        groups = f" [{', '.join(user.groups)}]" if user.groups else ""
        models = ", ".join(user.models) or "(no models)"
        lines.append(f"  {user.name}{groups}: {models}; {_quota(user.quota)}")
    return "\n".join(lines)
