"""What the in-process gRPC and REST servers share (both import this module; neither imports the other).

:func:`servable_for`: the servable a server was given, or one loaded from a model folder.
:func:`check_loopback`: the development servers have no authentication and bind loopback addresses only.
:func:`signature_def_map`: a servable's SignatureDefs as TF Serving's metadata message (``GetModelMetadata``
over gRPC, ``GET /v1/models/NAME/metadata`` over REST).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from tensorflow_serving.apis import get_model_metadata_pb2

from mdgru_keras.serving.servable import Servable


def servable_for(model_path: str | Path | None, model_name: str, servable: Servable | None) -> Servable:
    """``servable`` if given (servers may share one), else the model at ``model_path`` loaded as ``model_name``."""
    if servable is not None:
        return servable
    if model_path is None:
        raise ValueError("give model_path or servable")
    return Servable(model_path, model_name)


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
