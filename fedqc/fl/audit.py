"""A ClientApp mod that records what every reply carries: the privacy test reads it.

When the run config names an audit folder, each reply a site sends appends one JSON line to
``<audit-dir>/<site-id>.jsonl``: the task, and for every record its type and items (array names
with dtype and shape; metric and config keys with their value and type; an error's code and
reason). The line is written after the ClientApp built the reply, just before Flower sends it,
so it shows exactly what left the site.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedqc.fl import appdir, records
from fedqc.fl.site_runner import site_id_of


def describe_reply(request: Message, reply: Message) -> dict:
    """One audit entry: the task asked for and everything the reply holds."""
    config = records.record_to_config(request.content[records.CONFIG]) if request.has_content() else {}
    entry: dict = {"task": config.get("task"), "message_type": reply.metadata.message_type}
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        entry["records"] = records.describe_content(reply.content)
    return entry


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass the message on; record the reply when the run config asks for an audit."""
    reply = call_next(msg, context)
    audit_dir = str(context.run_config.get(appdir.AUDIT_DIR, ""))
    if audit_dir:
        folder = Path(audit_dir)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = json.dumps(describe_reply(msg, reply)) + "\n"
        fd = os.open(folder / f"{site_id_of(context)}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(line)
    return reply
