"""Image files sent as text: base64, with line breaks and a `data:...;base64,` prefix allowed.

One rule for every JSON body that carries images: v1's `instances`, the Open Inference
Protocol's `BYTES` elements in JSON, and TensorFlow Serving's `{"b64": ...}` values.
"""

from __future__ import annotations

import base64
import binascii

from training.errors import InvalidInput


def decode_b64(text: str, where: str) -> bytes:
    """Decode one base64 image; `where` names it in the error (e.g. `instances[0].b64`)."""
    if text.startswith("data:") and "," in text:
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{where} is empty")
    return data
