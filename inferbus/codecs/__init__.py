"""Pure, I/O-free conversions between numpy tensors and the bytes inferbus puts on NATS."""

from inferbus.codecs._datatypes import BYTES, DATATYPES, datatype_of, numpy_dtype
from inferbus.codecs.wire import (
    InferRequest,
    InferResponse,
    Tensors,
    decode_error,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
)

__all__ = [
    "BYTES",
    "DATATYPES",
    "InferRequest",
    "InferResponse",
    "Tensors",
    "datatype_of",
    "decode_error",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "numpy_dtype",
]
