"""Typed codec errors: one class per kind of bad input, each message naming what was wrong.

Everything derives from `CodecError(ValueError)`, so the runtime can route any undecodable
message to the DLQ with one `except`, and use the class name as the reason. The runtime adds
topic/partition/offset itself; tensor errors carry the tensor's name when the caller knows it.
"""


class CodecError(ValueError):
    """A message or datum the codec cannot encode or decode."""


class EmptyMessage(CodecError):
    """The message has no bytes at all (e.g. a tombstone on a data topic)."""


class TruncatedHeader(CodecError):
    """The message is shorter than the 5-byte Confluent header."""


class UnknownMagicByte(CodecError):
    """The first byte is not the Confluent wire-format magic byte 0."""


class UnknownSchemaId(CodecError):
    """The header names a schema id this registry does not know."""


class UnknownSchemaName(CodecError):
    """An encoder asked for a schema name this registry does not know."""


class SchemaMismatch(CodecError):
    """The message is framed with a different schema than the caller expects."""


class MalformedAvro(CodecError):
    """The Avro payload is truncated, garbage, or followed by trailing bytes."""


class InvalidDatum(CodecError):
    """A datum does not fit its schema, or breaks an invariant the schema cannot express."""


class BadTensor(CodecError):
    """A tensor that fails validation; `tensor` names it when the caller said which one."""

    def __init__(self, problem: str, *, tensor: str | None = None) -> None:
        super().__init__(problem if tensor is None else f"tensor {tensor!r}: {problem}")
        self.problem = problem
        self.tensor = tensor


class UnsupportedDtype(BadTensor):
    """The dtype is outside the allowed set."""


class NegativeDimension(BadTensor):
    """The shape has a dimension below zero."""


class SizeMismatch(BadTensor):
    """The byte length is not the shape's element count times the dtype's item size."""


class TensorTooLarge(BadTensor):
    """The tensor's bytes exceed the size limit."""


class NonFiniteValue(BadTensor):
    """The tensor holds NaN or Inf where the caller forbids them."""
