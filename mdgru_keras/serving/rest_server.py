"""An in-process server for TF Serving's REST API on top of any SavedModel (standard library ``http.server``).

Routes (as ``tensorflow_model_server --rest_api_port``)::

    GET  /v1/models/NAME[/versions/N]             model status
    GET  /v1/models/NAME[/versions/N]/metadata    signature definitions
    POST /v1/models/NAME[/versions/N]:predict     {"signature_name": ..., "inputs": {...}}  (columnar format)

Predict answers ``{"outputs": {name: nested lists}}`` (a lone output is given without its name, as TF Serving
does). JSON values are converted to each input's dtype from the signature; a value that does not fit (a
fraction for an int16 input, a string for a float input, ragged lists) is a 400. Errors are
``{"error": "message"}`` with the HTTP status TF Serving uses for the gRPC code (400 for INVALID_ARGUMENT).
Row format (``"instances"``) is not implemented: the contract's signatures take one unbatched scan.

Like :mod:`mdgru_keras.serving.grpc_server` it is a development server on loopback only (production: the
official TensorFlow Serving image, see ``serving/README.md``); ``mdgru-localize serve`` runs both.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from mdgru_keras.serving import DEFAULT_MODEL_NAME, DEFAULT_SIGNATURE, HTTP_STATUS_BY_CODE, ServingError
from mdgru_keras.serving.servable import Servable, dtype_name
from mdgru_keras.serving.server_common import check_loopback, servable_for, signature_def_map

MAX_BODY_BYTES = 2 * 1024**3  # a 256^3 volume as JSON text is ~0.2-0.4 GB

_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<rest>/metadata|:predict)?$")


def json_to_array(name: str, value: Any, dtype: tf.DType) -> np.ndarray:
    """A JSON value (nested lists) -> an array of ``dtype``; ``INVALID_ARGUMENT`` when it does not fit."""
    if dtype == tf.string:

        def to_bytes(item: Any) -> Any:
            if isinstance(item, list):
                return [to_bytes(x) for x in item]
            if isinstance(item, dict) and set(item) == {"b64"}:
                return base64.b64decode(item["b64"])
            if isinstance(item, str):
                return item.encode("utf-8")
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: expected strings, got {type(item).__name__}")

        try:
            return np.array(to_bytes(value), dtype=object)
        except ValueError as error:
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: {error}") from error
    try:
        array = np.array(value)
    except ValueError as error:  # ragged nesting
        raise ServingError("INVALID_ARGUMENT", f"input {name!r} is not a rectangular array: {error}") from error
    if array.dtype.kind not in "biuf":
        raise ServingError(
            "INVALID_ARGUMENT",
            f"input {name!r} must be (nested lists of) numbers for dtype "
            f"{dtype.name}, got {dtype_name(array.dtype)} values",
        )
    if dtype.is_bool:
        if array.dtype.kind != "b":
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: expected true/false values for dtype bool")
    elif dtype.is_integer:
        if array.dtype.kind == "f":
            raise ServingError("INVALID_ARGUMENT", f"input {name!r} holds non-integer numbers; dtype is {dtype.name}")
        if array.size and (array.min() < dtype.min or array.max() > dtype.max):
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input {name!r} holds values outside the {dtype.name} range [{dtype.min}, {dtype.max}]",
            )
    elif not (dtype.is_floating or dtype.is_complex):
        raise ServingError("UNIMPLEMENTED", f"input {name!r}: dtype {dtype.name} is not supported over REST here")
    return array.astype(dtype.as_numpy_dtype)


def array_to_json(value: np.ndarray) -> Any:
    """An output array -> JSON-ready nested lists (strings as text; non-UTF-8 bytes as ``{"b64": ...}``)."""
    if value.dtype == object or value.dtype.kind == "S":

        def to_text(item: Any) -> Any:
            if isinstance(item, list):
                return [to_text(x) for x in item]
            try:
                return item.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(item).decode("ascii")}

        return to_text(value.tolist())
    return value.tolist()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet; TF Serving logs nothing either
        pass

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, error: ServingError) -> None:
        self._send(HTTP_STATUS_BY_CODE.get(error.code, 500), {"error": error.message})

    def _route(self) -> tuple[int | None, str]:
        match = _ROUTE.match(self.path.split("?", 1)[0])
        if match is None:
            raise ServingError("NOT_FOUND", f"Malformed request: {self.command} {self.path}")
        version = int(match["version"]) if match["version"] else None
        self.server.servable.check_model(match["name"], version)
        return version, match["rest"] or ""

    def do_GET(self) -> None:  # noqa: N802
        try:
            _, rest = self._route()
            if rest == ":predict":
                raise ServingError("INVALID_ARGUMENT", f"Malformed request: {self.command} {self.path} (use POST)")
            servable = self.server.servable
            model_spec = {"name": servable.model_name, "signature_name": "", "version": str(servable.version)}
            if rest == "/metadata":
                signatures = json_format.MessageToDict(signature_def_map(servable), preserving_proto_field_name=True)
                self._send(200, {"model_spec": model_spec, "metadata": {"signature_def": signatures}})
            else:
                status = {"error_code": "OK", "error_message": ""}
                versions = [{"version": str(servable.version), "state": "AVAILABLE", "status": status}]
                self._send(200, {"model_version_status": versions})
        except ServingError as error:
            self._send_error(error)
        except Exception as error:
            self._send_error(ServingError("INTERNAL", f"{type(error).__name__}: {error}"))

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ServingError("INVALID_ARGUMENT", "request has no Content-Length")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise ServingError(
                "RESOURCE_EXHAUSTED",
                f"request body of {int(length)} bytes exceeds the {self.server.max_body_bytes} byte limit",
            )
        body = self.rfile.read(int(length))
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {error}") from error

    def _predict(self) -> dict[str, Any]:
        _, rest = self._route()
        if rest != ":predict":
            raise ServingError("INVALID_ARGUMENT", f"Malformed request: {self.command} {self.path}")
        request = self._read_json()
        if not isinstance(request, dict):
            raise ServingError("INVALID_ARGUMENT", "request body must be a JSON object")
        if "instances" in request:
            raise ServingError(
                "INVALID_ARGUMENT",
                "row format ('instances') is not supported by this server; "
                "send the columnar format {'inputs': {name: value}}",
            )
        if "inputs" not in request:
            raise ServingError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")
        servable = self.server.servable
        signature_name = request.get("signature_name") or DEFAULT_SIGNATURE
        if not isinstance(signature_name, str):
            raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
        signature = servable.signature(signature_name)
        named = request["inputs"]
        if not isinstance(named, dict):  # one unnamed input: allowed when the signature has exactly one
            if len(signature.inputs) != 1:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"'inputs' must name the {len(signature.inputs)} inputs {sorted(signature.inputs)}",
                )
            named = {next(iter(signature.inputs)): named}
        inputs = {}
        for name, value in named.items():
            if name not in signature.inputs:
                inputs[name] = np.array(0)  # reported as unexpected, with the signature, by validate()
                continue
            inputs[name] = json_to_array(name, value, tf.as_dtype(signature.inputs[name].dtype))
        outputs = servable.predict(signature_name, inputs)
        if len(outputs) == 1:
            return {"outputs": array_to_json(next(iter(outputs.values())))}
        return {"outputs": {name: array_to_json(value) for name, value in outputs.items()}}

    def do_POST(self) -> None:  # noqa: N802
        try:
            payload = self._predict()
        except ServingError as error:
            self._send_error(error)
            return
        except Exception as error:
            self._send_error(ServingError("INTERNAL", f"{type(error).__name__}: {error}"))
            return
        self._send(200, payload)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], servable: Servable, max_body_bytes: int) -> None:
        self.servable = servable
        self.max_body_bytes = max_body_bytes
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class RestServer:
    """TF Serving's REST API for one SavedModel on ``host:port`` (``port=0``: a free one, see ``.port``)."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
        servable: Servable | None = None,
    ) -> None:
        self.servable = servable = servable_for(model_path, model_name, servable)
        self._httpd = _HttpServer((check_loopback(host), port), servable, max_body_bytes)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> RestServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rest-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RestServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
