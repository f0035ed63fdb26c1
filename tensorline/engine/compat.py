"""Where kafka-python 3.0 differs from the Java client in a way a foreign producer can exploit,
made to behave as the Java client does. Applied once, when the engine's client factories load.

Header keys: Kafka's protocol says a header key is a UTF-8 string, but nothing on the broker
checks it, so any client can write bytes such as ``ff fe``. The Java consumer decodes header keys
with replacement characters (``new String(bytes, UTF_8)``); kafka-python decodes them strictly,
and the ``UnicodeDecodeError`` becomes a ``CorruptRecordError`` raised from ``consumer.poll`` on
every poll: the partition can never be read past that record, and a stage crash-loops on it.
Here the record reader decodes header keys with ``errors="replace"``, as Java does: the record is
delivered, its odd key shown as U+FFFD characters.
"""

from __future__ import annotations

import inspect
import textwrap

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
