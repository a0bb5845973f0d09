"""REST client for TF Serving's HTTP API.

Servers: ``tensorflow_model_server --rest_api_port``, or :mod:`mdgru_keras.serving.rest_server`
(``mdgru-localize serve``).

Same API and results as :class:`mdgru_keras.serving.grpc_client.GrpcLocalizationClient` (within float printing
precision), over ``POST /v1/models/NAME:predict`` with the columnar JSON format. Output dtypes come from the
model's metadata (``GET /v1/models/NAME/metadata``, fetched once). A server that cannot be reached (or answers
503) is retried up to ``max_attempts`` times with exponential backoff; errors are
:class:`mdgru_keras.serving.ServingError` with the gRPC code name that matches the HTTP status
(400 -> ``INVALID_ARGUMENT``).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import requests

from mdgru_keras.serving import (
    CODE_BY_HTTP_STATUS,
    DEFAULT_MODEL_NAME,
    DEFAULT_SIGNATURE,
    LocalizationClient,
    ServingError,
    decode_strings,
)

_NUMPY_DTYPES = {
    "DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_HALF": np.float16, "DT_INT8": np.int8,
    "DT_INT16": np.int16, "DT_INT32": np.int32, "DT_INT64": np.int64, "DT_UINT8": np.uint8,
    "DT_UINT16": np.uint16, "DT_UINT32": np.uint32, "DT_UINT64": np.uint64, "DT_BOOL": np.bool_,
    "DT_STRING": np.str_,
}  # fmt: skip
_DTYPE_NAMES = {
    "DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16", "DT_INT8": "int8", "DT_INT16": "int16",
    "DT_INT32": "int32", "DT_INT64": "int64", "DT_UINT8": "uint8", "DT_UINT16": "uint16", "DT_UINT32": "uint32",
    "DT_UINT64": "uint64", "DT_BOOL": "bool", "DT_STRING": "string",
}  # fmt: skip


def _to_json(value: np.ndarray) -> Any:
    if value.dtype.kind in "SO":

        def encode(item: Any) -> Any:
            if isinstance(item, list):
                return [encode(x) for x in item]
            if isinstance(item, bytes):
                try:
                    return item.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(item).decode("ascii")}
            return item

        return encode(value.tolist())
    return value.tolist()


def _from_json(value: Any, dtype_enum: str | None) -> np.ndarray:
    def strings(item: Any) -> Any:
        if isinstance(item, list):
            return [strings(x) for x in item]
        if isinstance(item, dict) and "b64" in item:
            return base64.b64decode(item["b64"]).decode("utf-8", errors="replace")
        return item

    if dtype_enum == "DT_STRING":
        return np.array(strings(value), dtype=str)
    numpy_dtype = _NUMPY_DTYPES.get(dtype_enum or "")
    array = np.array(strings(value)) if numpy_dtype is None else np.array(value, dtype=numpy_dtype)
    return decode_strings(array)


def _shape(info: dict[str, Any]) -> tuple[int, ...] | None:
    shape = info.get("tensor_shape", {})
    if shape.get("unknown_rank"):
        return None
    return tuple(int(dim.get("size", -1)) for dim in shape.get("dim", []))


class RestLocalizationClient(LocalizationClient):
    """Talks to ``server`` (``http://HOST:PORT``, TF Serving's REST port, 8501 by default).

    Args: as :class:`mdgru_keras.serving.grpc_client.GrpcLocalizationClient` (``timeout_s`` per HTTP request).
    """

    def __init__(
        self,
        server: str = "http://127.0.0.1:8501",
        model_name: str = DEFAULT_MODEL_NAME,
        *,
        timeout_s: float = 120.0,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
        version: int | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if "://" not in server:
            server = f"http://{server}"
        self.server = server.rstrip("/")
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.version = version
        self._session = requests.Session()
        self._signatures: dict[str, Any] | None = None
        self.last_attempts = 0

    @property
    def model_url(self) -> str:
        url = f"{self.server}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{self.version}"

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, url: str, what: str, body: bytes | None = None) -> Any:
        """One HTTP exchange with retries on connection failures and 503; the decoded JSON answer."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            self.last_attempts = attempt
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                response = self._session.request(
                    method,
                    url,
                    data=body,
                    timeout=(min(remaining, 10.0), remaining),
                    headers={"Content-Type": "application/json"} if body is not None else None,
                )
            except requests.Timeout as error:
                raise ServingError(
                    "DEADLINE_EXCEEDED", f"{self.server}: no answer to {what} within {self.timeout_s:g} s"
                ) from error
            except requests.ConnectionError as error:
                failure = ServingError("UNAVAILABLE", f"cannot connect: {type(error).__name__}")
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError as error:
                        raise ServingError("INTERNAL", f"{what}: the answer is not JSON: {error}") from error
                try:
                    message = response.json().get("error") or response.text
                except ValueError:
                    message = response.text or response.reason
                failure = ServingError(
                    CODE_BY_HTTP_STATUS.get(response.status_code, "UNKNOWN"), f"HTTP {response.status_code}: {message}"
                )
                if failure.code != "UNAVAILABLE":
                    raise failure
            pause = self.backoff_s * 2 ** (attempt - 1)
            if attempt >= self.max_attempts or time.monotonic() + pause >= deadline:
                elapsed = time.monotonic() - start
                raise ServingError(
                    "UNAVAILABLE",
                    f"{self.server} unavailable for {what} after {attempt} "
                    f"attempt{'s' * (attempt > 1)} in {elapsed:.1f} s: "
                    f"{failure.message}",
                )
            time.sleep(pause)

    def _signature_defs(self) -> dict[str, Any]:
        if self._signatures is None:
            answer = self._request("GET", f"{self.model_url}/metadata", f"metadata({self.model_name})")
            self._signatures = answer["metadata"]["signature_def"]["signature_def"]
        return self._signatures

    def metadata(self) -> dict[str, dict[str, dict[str, tuple[str, Any]]]]:
        """The served signatures: ``{signature: {"inputs": {name: (dtype, shape)}, "outputs": {...}}}``."""
        return {
            name: {
                part: {
                    key: (_DTYPE_NAMES.get(info["dtype"], info["dtype"]), _shape(info))
                    for key, info in sorted(signature.get(part, {}).items())
                }
                for part in ("inputs", "outputs")
            }
            for name, signature in sorted(self._signature_defs().items())
            if not name.startswith("__")
        }

    def predict(self, inputs: dict[str, np.ndarray], signature: str = DEFAULT_SIGNATURE) -> dict[str, np.ndarray]:
        """Run ``signature`` on ``inputs``; outputs by name in the signature's dtypes, strings as ``str``."""
        body = json.dumps(
            {"signature_name": signature, "inputs": {name: _to_json(np.asarray(v)) for name, v in inputs.items()}}
        ).encode("utf-8")
        answer = self._request("POST", f"{self.model_url}:predict", f"predict({self.model_name}/{signature})", body)
        output_infos = self._signature_defs().get(signature, {}).get("outputs", {})
        outputs = answer.get("outputs")
        if not isinstance(outputs, dict):  # a lone output comes without its name
            outputs = {next(iter(output_infos), "output"): outputs}
        return {name: _from_json(value, output_infos.get(name, {}).get("dtype")) for name, value in outputs.items()}
