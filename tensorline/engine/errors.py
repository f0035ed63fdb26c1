"""How the runtime sorts failures, as Kafka's Java client does: record, transient, fatal.

- A **record** error belongs to one input record (it cannot be decoded, fails the stage's check,
  makes the model reject it, or its output cannot be sent): the record goes to the dead-letter
  topic once, with a reason, and the stage goes on.
- A **transient** error may pass (the broker is unreachable or times out, the group rebalanced,
  the GPU ran out of memory, a device went away): the work is retried with backoff and never
  dead-lettered.
- A **fatal** error will not pass by retrying (fenced by a newer instance, not authorized, a bad
  configuration): the worker stops with one clear message and its supervisor does not restart it.

A stage raises `DeadLetter` (with a short `reason`), `Transient` or `Fatal` to say which it
means; anything else is sorted by `classify` from its type.
"""

from __future__ import annotations

import enum

from kafka import errors as kafka_errors


class DeadLetter(Exception):
    """A record this stage cannot take: it goes to the dead-letter topic with `reason`, a short
    machine-readable word (`non_finite`, `too_large`, `bad_shape`, ...) that `tensorline dlq list`
    groups by; the message says what was wrong, for a person."""

    def __init__(self, message: str, reason: str = "rejected"):
        super().__init__(message)
        self.reason = reason


class Transient(Exception):
    """A failure that may pass: retried with backoff, never dead-lettered."""


class Fatal(Exception):
    """The worker cannot go on: it stops with this message (exit code `FATAL_EXIT_CODE`)."""


class AuthenticationFailed(Fatal, RuntimeError):
    """The broker refused a principal's credentials (a wrong password, no such user): the message
    names the principal and the bootstrap address. A RuntimeError too, so every command, not only
    a worker, reports it as one line."""


class Kind(enum.Enum):
    RECORD = "record"
    TRANSIENT = "transient"
    FATAL = "fatal"


# A worker stopped by a fatal error exits with this code; the supervisor gives it up at once
# instead of restarting it into the same error.
FATAL_EXIT_CODE = 3

# Kafka errors that no retry mends: another instance owns the transactional id, a principal
# lacks an ACL, or the client and broker do not speak the same protocol.
_KAFKA_FATAL = (
    kafka_errors.ProducerFencedError,
    kafka_errors.TransactionalIdAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.SaslAuthenticationFailedError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.KafkaConfigurationError,
    kafka_errors.UnsupportedForMessageFormatError,
)
# Kafka errors that belong to one record: the broker or the client refused it as it is.
_KAFKA_RECORD = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.InvalidRecordError,
    kafka_errors.CorruptRecordError,
)
# TensorFlow's errors, by class name so the engine does not import TensorFlow: running out of
# (GPU) memory, a device or service going away, a call cut short. InvalidArgumentError and the
# rest are a model rejecting its input: record errors.
_TF_TRANSIENT = frozenset({"ResourceExhaustedError", "UnavailableError", "AbortedError", "DeadlineExceededError",
                           "InternalError", "CancelledError"})
_PY_TRANSIENT = (MemoryError, TimeoutError, ConnectionError)


def classify(error: BaseException) -> Kind:
    """Record, transient or fatal, from the error's type (see the module docstring)."""
    if isinstance(error, DeadLetter):
        return Kind.RECORD
    if isinstance(error, Transient):
        return Kind.TRANSIENT
    if isinstance(error, Fatal):
        return Kind.FATAL
    if isinstance(error, kafka_errors.KafkaError):
        if isinstance(error, _KAFKA_FATAL):
            return Kind.FATAL
        if isinstance(error, _KAFKA_RECORD):
            return Kind.RECORD
        return Kind.TRANSIENT  # timeouts, connections, rebalances, abortable transaction states
    if type(error).__module__.startswith("tensorflow") and type(error).__name__ in _TF_TRANSIENT:
        return Kind.TRANSIENT
    if isinstance(error, _PY_TRANSIENT):
        return Kind.TRANSIENT
    return Kind.RECORD


def out_of_memory(error: BaseException) -> bool:
    """True for errors a smaller batch may avoid (host or device memory)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError"


def reason(error: BaseException) -> str:
    """The dead letter's reason: a DeadLetter's own, else the error's class name (`BadTensor`)."""
    return error.reason if isinstance(error, DeadLetter) else type(error).__name__
