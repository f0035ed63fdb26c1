"""Where kafka-python 3.0 differs from the Java client in a way a foreign producer can exploit,
made to behave as the Java client does. Applied once, when the engine's client factories load.

Header keys: Kafka's protocol says a header key is a UTF-8 string, but nothing on the broker
checks it, so any client can write bytes such as ``ff fe``. The Java consumer decodes header keys
with replacement characters (``new String(bytes, UTF_8)``); kafka-python decodes them strictly,
and the ``UnicodeDecodeError`` becomes a ``CorruptRecordError`` raised from ``consumer.poll`` on
every poll: the partition can never be read past that record, and a stage crash-loops on it.
Here the record reader decodes header keys with ``errors="replace"``, as Java does: the record is
delivered, its odd key shown as U+FFFD characters.

Transactional requests: kafka-python 3.0.12's sender drops a transactional request (AddOffsetsToTxn,
TxnOffsetCommit, EndTxn, ...) when connecting to its coordinator raises (a broker just killed, its
port refusing): it looks the coordinator up again but retries the request only when no coordinator
was known, so the caller (`send_offsets_to_transaction`, `commit_transaction`, which wait without
a timeout) waits forever. The Java client's Sender retries the request whenever it was not sent
(`transactionManager.retry(nextRequestHandler)` after its loop); here, the same.
"""

from __future__ import annotations

import inspect
import textwrap

from kafka.producer import sender
from kafka.record import default_records

_STRICT = 'h_key = buffer[pos: pos + h_key_len].decode("utf-8")'
_REPLACE = 'h_key = buffer[pos: pos + h_key_len].decode("utf-8", "replace")'


def lenient_header_keys() -> None:
    """Patch kafka-python's v2 record reader to decode header keys as the Java client does.

    The patched reader is kafka-python's own `_read_msg`, recompiled with one call changed, so it
    follows the installed version; if that line is not found exactly once (kafka-python changed),
    this raises at import rather than silently leaving the strict decode in place.
    """
    batch = default_records.DefaultRecordBatch
    if getattr(batch._read_msg, "_tensorline_lenient", False):
        return
    source = textwrap.dedent(inspect.getsource(batch._read_msg))
    if source.count(_STRICT) != 1:
        raise RuntimeError("kafka-python's DefaultRecordBatch._read_msg changed: "
                           "tensorline.engine.compat.lenient_header_keys needs a look")
    namespace: dict = {}
    exec(compile(source.replace(_STRICT, _REPLACE), default_records.__file__, "exec"),  # noqa: S102
         vars(default_records), namespace)
    read_msg = namespace["_read_msg"]
    read_msg._tensorline_lenient = True
    batch._read_msg = read_msg


_RETRY_IF_NO_NODE = """\
    if target_node is None:
        self._transaction_manager.retry(next_request_handler)
"""
_RETRY_UNSENT = """\
    self._transaction_manager.retry(next_request_handler)  # not sent: retried, as the Java client does
"""


def retry_unsent_transactional_requests() -> None:
    """Patch kafka-python's Sender to retry every transactional request it did not send.

    The patched method is kafka-python's own `_maybe_send_pending_request`, recompiled with its
    last retry made unconditional (the loop before it returns once a request is sent); if that
    code is not found exactly once (kafka-python changed), this raises at import.
    """
    cls = sender.Sender
    if getattr(cls._maybe_send_pending_request, "_tensorline_retry", False):
        return
    source = textwrap.dedent(inspect.getsource(cls._maybe_send_pending_request))
    if source.count(_RETRY_IF_NO_NODE) != 1 or source.count("return True") != 2:
        raise RuntimeError("kafka-python's Sender._maybe_send_pending_request changed: "
                           "tensorline.engine.compat.retry_unsent_transactional_requests needs a look")
    namespace: dict = {}
    exec(compile(source.replace(_RETRY_IF_NO_NODE, _RETRY_UNSENT), sender.__file__, "exec"),  # noqa: S102
         vars(sender), namespace)
    method = namespace["_maybe_send_pending_request"]
    method._tensorline_retry = True
    cls._maybe_send_pending_request = method
