"""What a conversation may be, the spec format's rule for every source of data and every prompt: an
optional system turn, then user and assistant turns alternating, ending with an assistant turn."""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def check_conversation(turns: list[dict]) -> str | None:
    """None when roles are valid: optional system, then user/assistant alternating, ending on assistant."""
    if not turns:
        return "a conversation needs at least one user and one assistant turn"
    roles = [t["role"] for t in turns]
    for i, role in enumerate(roles):
        if role not in ROLES:
            return (f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)}; "
                    "map others with role_map)")
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return f"turn {roles.index('system', 1)}: a system turn may only come first"
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            offset = len(roles) - len(body)
            return (f"turn {i + offset}: expected a {expected} turn, got {role!r} "
                    "(roles must alternate user/assistant)")
    if not body or body[-1] != "assistant":
        return "a training conversation must end with an assistant turn (it is what the model learns)"
    return None
