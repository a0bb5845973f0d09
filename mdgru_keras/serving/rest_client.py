"""REST client for TF Serving's HTTP API.

Servers: ``tensorflow_model_server --rest_api_port``, or :mod:`mdgru_keras.serving.rest_server`
(``mdgru-localize serve``).

Same API and results as :class:`mdgru_keras.serving.grpc_client.GrpcLocalizationClient` (within float printing
precision), over ``POST /v1/models/NAME:predict`` with the columnar JSON format. Output dtypes come from the
model's metadata (``GET /v1/models/NAME/metadata``, fetched once). A server that cannot be reached (or answers
502 or 503) is retried up to ``max_attempts`` times with exponential backoff (:class:`mdgru_keras.serving.RetryPolicy`),
by urllib3's ``Retry`` mounted on the ``requests`` session (:func:`retrying_session`); a connection lost after the
request was sent, and a timeout waiting for the answer, are not retried. Errors are
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
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from mdgru_keras.serving import (
    CODE_BY_HTTP_STATUS,
    DEFAULT_MODEL_NAME,
    DEFAULT_SIGNATURE,
    LocalizationClient,
    RetryPolicy,
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


# The HTTP statuses that mean UNAVAILABLE (502, 503): retried like gRPC's UNAVAILABLE.
RETRY_STATUSES = frozenset(status for status, code in CODE_BY_HTTP_STATUS.items() if code == "UNAVAILABLE")


class _Retry(Retry):
    """urllib3's ``Retry`` with the pauses of :meth:`RetryPolicy.pause_s` (urllib3's own schedule retries the
    first time at once): ``backoff_factor`` is the first pause, each further one twice the one before."""

    def get_backoff_time(self) -> float:
        retry = len(self.history)  # failed attempts so far: the coming attempt is retry number `retry`
        if retry == 0 or self.backoff_factor <= 0:
            return 0.0
        return min(self.backoff_max, RetryPolicy(backoff_s=self.backoff_factor).pause_s(retry))


def retrying_session(retry: RetryPolicy) -> requests.Session:
    """A ``requests`` session that retries by ``retry``: connection failures and 502/503 answers, GET and POST
    (the model's signatures are pure functions, so a repeated predict is harmless); not read errors (a timeout
    waiting for the answer, a connection lost mid-answer) and no redirects. After the last attempt the last
    502/503 answer is returned, or ``requests.ConnectionError`` (from urllib3's ``MaxRetryError``) raised."""
    retries = _Retry(
        total=retry.retries,
        connect=retry.retries,
        read=False,
        status=retry.retries,
        other=0,
        redirect=0,
        allowed_methods=frozenset({"GET", "POST"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=retry.backoff_s,
        backoff_max=retry.max_pause_s,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retries)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _connection_problem(error: requests.ConnectionError) -> tuple[str, bool]:
    """``(one-line problem, whether urllib3 used up the retries)`` of a failed connection."""
    reason = error.args[0] if error.args else error
    exhausted = isinstance(reason, MaxRetryError)
    if exhausted:
        reason = reason.reason
    text = str(reason)
    if "Failed to establish a new connection: " in text:  # urllib3's NewConnectionError: keep the OS's reason
        text = text.split("Failed to establish a new connection: ", 1)[1]
    return f"cannot connect: {text}", exhausted


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
        self.retry = RetryPolicy(max_attempts, backoff_s)
        if "://" not in server:
            server = f"http://{server}"
        self.server = server.rstrip("/")
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.version = version
        self._session = retrying_session(self.retry)
        self._signatures: dict[str, Any] | None = None

    @property
    def model_url(self) -> str:
        url = f"{self.server}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{self.version}"

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, url: str, what: str, body: bytes | None = None) -> Any:
        """One HTTP exchange (the session retries connection failures and 502/503); the decoded JSON answer."""
        start = time.monotonic()
        try:
            response = self._session.request(
                method,
                url,
                data=body,
                timeout=(min(self.timeout_s, 10.0), self.timeout_s),
                headers={"Content-Type": "application/json"} if body is not None else None,
            )
        except requests.ConnectionError as error:  # before Timeout: a connect timeout is both, and was retried
            problem, exhausted = _connection_problem(error)
            if exhausted:
                raise self.retry.gave_up(
                    self.server, what, self.retry.max_attempts, time.monotonic() - start, problem
                ) from None
            raise ServingError("UNAVAILABLE", f"{self.server}: {what}: {problem}") from None
        except requests.Timeout as error:
            raise ServingError(
                "DEADLINE_EXCEEDED", f"{self.server}: no answer to {what} within {self.timeout_s:g} s"
            ) from error
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
        if response.status_code in RETRY_STATUSES:  # the retries are used up
            retries = getattr(response.raw, "retries", None)
            attempts = 1 + (len(retries.history) if retries is not None else self.retry.retries)
            raise self.retry.gave_up(self.server, what, attempts, time.monotonic() - start, failure.message)
        raise failure

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
