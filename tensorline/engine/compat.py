"""Where kafka-python 3.0 differs from the Java client in a way that hurts a pipeline (a foreign
producer's record, a broker killed, a wrong password), made to behave as the Java client does.
Applied once, when the engine's client factories load.

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

Authentication failures: kafka-python 3.0.12 retries a bootstrap connection the broker refused to
authenticate (a wrong SCRAM password) like one it could not reach, until its timeout, then raises
"Unable to bootstrap" (30 s later, the cause only in its log). The Java client raises an
authentication failure at once (`SaslAuthenticationException`, not retried); here, the same. And
the broker answers a failed authentication, then closes the connection: when the answer and the
close arrive in one read, kafka-python's transport dropped the answer and saw only "socket
disconnected" (the consumer, whose IO runs on its own thread, nearly always). The Java client
handles the bytes received before a close first; here, the same.

Group joins: kafka-python 3.0.12 drives a join only while `need_rejoin()`. When the consumer asks
for a rejoin itself (its subscription or a subscribed topic's partitions changed), that turns
false once the JoinGroup is sent, so a join that completed after its poll's timeout was never
taken up: the member stayed rebalancing with heartbeats off and its assignment unapplied until
the group evicted it, and never rejoined. And a join completed between two polls was dropped and
sent again: a new rebalance per poll. The Java client joins while a join is needed or pending and
takes up a completed one (`AbstractCoordinator.rejoinNeededOrPending`, `joinFuture`); here, a
join stays needed until it succeeds, and a completed one is taken up.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from types import ModuleType

from kafka.coordinator import base
from kafka.net import manager, transport
from kafka.producer import sender
from kafka.record import default_records


def _recompile(owner: type, name: str, module: ModuleType, replacements: list[tuple[str, str]], patch: str, *,
               check: Callable[[str], bool] = lambda source: True) -> None:
    """Replace `owner.name` by kafka-python's own source of it with each (old, new) of
    `replacements` made, compiled in `module`'s namespace, so the patch follows the installed
    version. Done once. When an `old` is not found exactly once or `check` fails (kafka-python
    changed), raise at import, naming `patch`, rather than leave the method unpatched."""
    method = getattr(owner, name)
    if getattr(method, "_tensorline_patched", False):
        return
    source = textwrap.dedent(inspect.getsource(method))
    if any(source.count(old) != 1 for old, _ in replacements) or not check(source):
        raise RuntimeError(f"kafka-python's {owner.__name__}.{name} changed: "
                           f"tensorline.engine.compat.{patch} needs a look")
    for old, new in replacements:
        source = source.replace(old, new)
    namespace: dict = {}
    exec(compile(source, module.__file__, "exec"), vars(module), namespace)  # noqa: S102
    patched = namespace[name]
    patched._tensorline_patched = True
    setattr(owner, name, patched)


_STRICT = 'h_key = buffer[pos: pos + h_key_len].decode("utf-8")'
_REPLACE = 'h_key = buffer[pos: pos + h_key_len].decode("utf-8", "replace")'


def lenient_header_keys() -> None:
    """Patch kafka-python's v2 record reader to decode header keys as the Java client does.

    The patched reader is kafka-python's own `_read_msg`, recompiled with one call changed, so it
    follows the installed version; if that line is not found exactly once (kafka-python changed),
    this raises at import rather than silently leaving the strict decode in place.
    """
    _recompile(default_records.DefaultRecordBatch, "_read_msg", default_records, [(_STRICT, _REPLACE)],
               "lenient_header_keys")

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
    _recompile(sender.Sender, "_maybe_send_pending_request", sender, [(_RETRY_IF_NO_NODE, _RETRY_UNSENT)],
               "retry_unsent_transactional_requests", check=lambda source: source.count("return True") == 2)

_BOOTSTRAP_RETRY = """\
        except Errors.IncompatibleBrokerVersion:
            log.error('Did you attempt to connect to a kafka controller (no metadata support)?')
            raise
"""
_BOOTSTRAP_AUTH_RAISES = _BOOTSTRAP_RETRY + """\
        except Errors.SaslAuthenticationFailedError as exc:  # not retried, as the Java client does
            self._conns.pop(bootstrap_broker.node_id, conn).close(exc)
            raise
"""


def raise_authentication_failures_at_bootstrap() -> None:
    """Patch kafka-python's bootstrap to raise SaslAuthenticationFailedError at once.

    The patched method is kafka-python's own `KafkaConnectionManager._do_bootstrap`, recompiled
    with one `except` clause added before its catch-all retry; if the clause it follows is not
    found exactly once (kafka-python changed), this raises at import.
    """
    _recompile(manager.KafkaConnectionManager, "_do_bootstrap", manager, [(_BOOTSTRAP_RETRY, _BOOTSTRAP_AUTH_RAISES)],
               "raise_authentication_failures_at_bootstrap")

_ABORT_FIRST = """\
        if err:
            return self.abort(error=err)
        log.debug('%s: received %d bytes', self, len(recvd_data))
"""
_DATA_FIRST = """\
        log.debug('%s: received %d bytes', self, len(recvd_data))
"""
_AFTER_DATA = """\
        except Errors.KafkaProtocolError as e:
            return self.abort(error=e)
"""
_THEN_ABORT = _AFTER_DATA + """\
        if err:  # the peer closed: once what it sent before is handled (the awaiting request resumed)
            if recvd_data:
                await self._net.sleep(0)
            return self.abort(error=err)
"""


def deliver_data_before_close() -> None:
    """Patch kafka-python's transport to hand on the bytes of a read that ended with the peer's
    close before it aborts the connection.

    The patched method is kafka-python's own `KafkaTCPTransport._read_from_sock` (the TLS
    transport's too), recompiled with its abort on a closed socket moved after the data is
    handed on; if that code is not found exactly once (kafka-python changed), this raises at import.
    """
    _recompile(transport.KafkaTCPTransport, "_read_from_sock", transport,
               [(_ABORT_FIRST, _DATA_FIRST), (_AFTER_DATA, _THEN_ABORT)], "deliver_data_before_close")

_NEW_JOIN_IF_DONE = "if self._join_task is None or self._join_task.is_done:"
_NEW_JOIN_IF_NONE = "if self._join_task is None:  # a join completed while no poll waited is taken up below"
_SEND_JOIN = "self._join_task = self._manager.call_soon(self._do_join_and_sync_async)"
_SEND_JOIN_NEEDED = "self.rejoin_needed = True  # until this join succeeds, whoever asked for it\n            " + _SEND_JOIN
_NON_RETRIABLE = """\
        except Errors.KafkaError:
            # Non-retriable error
            self._join_task = None
            raise
"""
_ANY_ERROR = """\
        except Exception:  # any error ends the attempt: it is not awaited again
            self._join_task = None
            raise
"""


def take_up_completed_joins() -> None:
    """Patch kafka-python's group coordinator to keep a join needed until it succeeds, and to
    take up a join that completed while no poll waited for it instead of sending it again.

    The patched method is kafka-python's own `BaseCoordinator.join_group_async`, recompiled with
    the need recorded when a join is sent, a pending join awaited even when done, and every error
    ending the attempt; if that code is not found exactly once (kafka-python changed), this raises
    at import.
    """
    _recompile(base.BaseCoordinator, "join_group_async", base,
               [(_NEW_JOIN_IF_DONE, _NEW_JOIN_IF_NONE), (_SEND_JOIN, _SEND_JOIN_NEEDED),
                (_NON_RETRIABLE, _NON_RETRIABLE + _ANY_ERROR)], "take_up_completed_joins")
