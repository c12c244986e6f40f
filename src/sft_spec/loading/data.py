"""Training conversations: the spec's inline ones, and its ``data.files`` read through ``sft_spec_load_data``.

What a conversation may be is the spec format's rule (an optional system turn, then user and assistant
turns alternating, ending with an assistant turn), checked here for every source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SpecError
from ..state import Conversation, SpecItem

if TYPE_CHECKING:
    from . import LoadContext

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


def resolve_conversations(item: SpecItem, ctx: LoadContext, errors: list[SpecError]) -> list[Conversation]:
    conversations: list[Conversation] = []
    for i, conv in enumerate(item.spec.data.conversations):
        turns = [m.model_dump() for m in conv]
        problem = check_conversation(turns)
        if problem:
            errors.append(SpecError(problem, item.locate("data", "conversations", i),
                                    key=f"data.conversations[{i}]"))
        conversations.append(turns)
    for i, source in enumerate(item.spec.data.files):
        where = item.locate("data", "files", i, "path")
        try:
            loaded = ctx.config.hook.sft_spec_load_data(source=source, item=item, config=ctx.config)
        except SpecError as exc:
            errors.append(SpecError(exc.message, exc.location or where, exc.key or f"data.files[{i}].path"))
            continue
        except ValueError as exc:  # the path rule
            errors.append(SpecError(str(exc), where, key=f"data.files[{i}].path"))
            continue
        if loaded is None:
            errors.append(SpecError(f"no plugin reads the data file {source.path!r}", where,
                                    key=f"data.files[{i}].path"))
            continue
        conversations.extend(loaded)
    if not conversations and not errors:
        errors.append(SpecError("no training conversations: add data.conversations or data.files",
                                item.locate("data"), key="data"))
    return conversations
