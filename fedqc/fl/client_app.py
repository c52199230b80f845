"""The fedqc ClientApp: every message goes to :func:`fedqc.fl.site_runner.handle`.

Train, evaluate and query messages share one handler; the task is in the message's config.
The audit mod records each reply when the run asks for it (see :mod:`fedqc.fl.audit`).
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedqc.fl import trace
from fedqc.fl.audit import audit_mod
from fedqc.fl.site_runner import handle as _handle

app = ClientApp(mods=[audit_mod])


def handle(msg: Message, context: Context) -> Message:
    """:func:`fedqc.fl.site_runner.handle`, timed when ``FEDQC_TRACE`` is set (:mod:`fedqc.fl.trace`)."""
    if not trace.enabled():
        return _handle(msg, context)
    entry = time.time()
    reply = _handle(msg, context)
    trace.event("clientapp", node=int(context.node_id), reply_to=str(msg.metadata.message_id),
                proc_start=trace.process_start(), entry=entry, exit=time.time())
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    """SUPERVISED, QC_AUTOENCODER and REFINE."""
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """EVALUATE."""
    return handle(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """PREDICT and the initial-weights request."""
    return handle(msg, context)
