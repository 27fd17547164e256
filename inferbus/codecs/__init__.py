"""Pure, I/O-free conversions between numpy tensors and the bytes inferbus puts on NATS."""

from inferbus.codecs._datatypes import BYTES, DATATYPES, datatype_of, numpy_dtype
from inferbus.codecs.base import Choices, Codec, CodecChoice
from inferbus.codecs.jpeg import Jpeg
from inferbus.codecs.registry import CODECS, get_codec
from inferbus.codecs.wire import (
    InferRequest,
    InferResponse,
    RequestHeader,
    TensorEntry,
    Tensors,
    decode_error,
    decode_error_fields,
    decode_request,
    decode_response,
    decode_tensors,
    encode_error,
    encode_request,
    encode_response,
    read_request_header,
)

__all__ = [
    "BYTES",
    "CODECS",
    "DATATYPES",
    "Choices",
    "Codec",
    "CodecChoice",
    "InferRequest",
    "InferResponse",
    "Jpeg",
    "RequestHeader",
    "TensorEntry",
    "Tensors",
    "datatype_of",
    "decode_error",
    "decode_error_fields",
    "decode_request",
    "decode_response",
    "decode_tensors",
    "encode_error",
    "encode_request",
    "encode_response",
    "get_codec",
    "numpy_dtype",
    "read_request_header",
]
