"""The wire schemas (.avsc files beside this module) and the codec between them and numpy.

Stages use the typed layer: `decode_record(message) -> Record`, `encode_detection(d) -> bytes`.
Every message is Confluent-framed Avro; every decoding failure is a `CodecError` subclass from
`tensorline.schemas.errors`, named for what was wrong.
"""

from tensorline.schemas.codec import (
    DTYPES,
    MAX_TENSOR_BYTES,
    decode,
    encode,
    read_header,
    tensor_from_avro,
    tensor_to_avro,
)
from tensorline.schemas.errors import BadTensor, CodecError
from tensorline.schemas.messages import (
    Detection,
    FusedResult,
    ModelRef,
    Record,
    decode_detection,
    decode_record,
    decode_result,
    encode_detection,
    encode_record,
    encode_result,
)
from tensorline.schemas.registry import DETECTION, FUSED_RESULT, RECORD

__all__ = [
    "DETECTION",
    "DTYPES",
    "FUSED_RESULT",
    "MAX_TENSOR_BYTES",
    "RECORD",
    "BadTensor",
    "CodecError",
    "Detection",
    "FusedResult",
    "ModelRef",
    "Record",
    "decode",
    "decode_detection",
    "decode_record",
    "decode_result",
    "encode",
    "encode_detection",
    "encode_record",
    "encode_result",
    "read_header",
    "tensor_from_avro",
    "tensor_to_avro",
]
