"""The wire's JSON: one encoder for every snapshot, event and answer (compact, UTF-8, no NaN).

``json.dumps`` with these options builds a new JSONEncoder -- and a new C encoder -- on every call,
which cost as much as encoding a snapshot; here the C encoder is built once. It has no
circular-reference markers (they would be shared between threads): a cycle ends in RecursionError.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

__all__ = ["encode_chunks", "encode_json", "encode_str"]

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

encode_str = encode_basestring  # a str as a JSON string literal (the C function the encoder uses)

if c_make_encoder is not None:
    _C_ENCODE = c_make_encoder(None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, False)

    def encode_json(value: Any) -> str:
        return "".join(_C_ENCODE(value, 0))

    # ``"".join(encode_chunks(value, 0)) == encode_json(value)``, one Python call fewer (the report path)
    encode_chunks = _C_ENCODE

else:  # pragma: no cover - an interpreter without the C accelerator
    encode_json = _ENCODER.encode

    def encode_chunks(value: Any, _level: int) -> tuple[str]:
        return (_ENCODER.encode(value),)
