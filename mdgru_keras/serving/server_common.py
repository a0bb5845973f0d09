"""What the in-process gRPC and REST servers share (both import this module; neither imports the other).

:func:`check_loopback`: the development servers have no authentication and bind loopback addresses only.
:func:`signature_def_map`: a servable's SignatureDefs as TF Serving's metadata message (``GetModelMetadata``
over gRPC, ``GET /v1/models/NAME/metadata`` over REST).
"""

from __future__ import annotations

import ipaddress

from tensorflow_serving.apis import get_model_metadata_pb2

from mdgru_keras.serving.servable import Servable


def check_loopback(host: str) -> str:
    """The development servers have no authentication: refuse anything but a loopback address."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"refusing to listen on {host!r}: the in-process servers bind loopback addresses only")
    return host


def signature_def_map(servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in servable.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature)
    return signature_map
