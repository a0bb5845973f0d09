"""Serving the exported localizer: gRPC and REST clients, and small in-process development servers.

Modules: :mod:`~mdgru_keras.serving.grpc_client` and :mod:`~mdgru_keras.serving.rest_client` (the clients),
:mod:`~mdgru_keras.serving.servable` (a SavedModel loaded for serving, and the in-process client ``predict``
uses), :mod:`~mdgru_keras.serving.grpc_server` and :mod:`~mdgru_keras.serving.rest_server` (TF Serving's APIs
on loopback, for tests and development: ``mdgru-localize serve``), :mod:`~mdgru_keras.serving.testing` (a toy
model with the contract's signatures). The exporter that writes the served model is :mod:`mdgru_keras.export`.
Deployment with TensorFlow Serving (``models.config``, the docker command) is in the repository's
``serving/`` folder, which is not part of the package.

Clients (both return the same dict of NumPy arrays)::

    from mdgru_keras.serving import connect
    with connect("127.0.0.1:8500") as client:                      # gRPC; "http://127.0.0.1:8501" for REST
        result = client.localize(volume, voxel_to_world)           # result["world_mm"]: float64 [K, 3]

Errors from the server, or from not reaching it, are :class:`ServingError` whose ``str`` is one line
``"CODE: message"`` (``CODE`` a gRPC status name such as ``INVALID_ARGUMENT`` or ``UNAVAILABLE``).

This module imports only NumPy (and :mod:`mdgru_keras.errors`); the gRPC/REST modules (and TensorFlow, which the
protos need) load on use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from mdgru_keras.errors import one_line_tf_error

DEFAULT_MODEL_NAME = "mdgru"
DEFAULT_SIGNATURE = "serving_default"
INT16_SIGNATURE = "localize_int16"
COARSE_SIGNATURE = "coarse"
DECODINGS_SIGNATURE = "decodings"  # every decoding of Table 1a (mdgru-localize evaluate)
# A 256^3 float32 scan is 64 MiB; leave ample room for larger scans and for the float64 outputs.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
LOCALIZE_OUTPUTS = (
    "landmark_names", "world_mm", "voxel", "coarse_world_mm", "coarse_voxel", "confidence", "flip_disagreement_mm"
)

# gRPC status code name -> HTTP status, as TF Serving's REST API maps them (tensorflow_serving/util/net_http).
HTTP_STATUS_BY_CODE = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
CODE_BY_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

class ServingError(RuntimeError):
    """A request the server refused or could not answer. ``str(error)`` is one line ``"CODE: message"``.

    ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, ...); REST errors are
    mapped to the same names from the HTTP status (400 -> ``INVALID_ARGUMENT``, 503 -> ``UNAVAILABLE``).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = one_line_tf_error(message)
        super().__init__(f"{code}: {self.message}")

    @property
    def http_status(self) -> int:
        return HTTP_STATUS_BY_CODE.get(self.code, 500)


# gRPC clamps a retry policy's maxAttempts to 5 (its MAX_MAX_RETRY_ATTEMPTS); both clients keep to that limit.
MAX_ATTEMPTS_LIMIT = 5
BACKOFF_MULTIPLIER = 2  # each pause between retries is this many times the one before


@dataclass(frozen=True)
class RetryPolicy:
    """When the clients try a request again, and how they say that they gave up; shared by both clients.

    A server that cannot be reached (not up yet, restarting, wrong port) or that answers ``UNAVAILABLE`` (HTTP
    502 or 503) is tried up to ``max_attempts`` times in all (at most :data:`MAX_ATTEMPTS_LIMIT`), pausing
    ``backoff_s`` before the first retry and :data:`BACKOFF_MULTIPLIER` times longer before each further one
    (:meth:`pause_s`). Nothing else is retried. The transports do the retrying: gRPC's retry policy in the
    channel's service config (:mod:`~mdgru_keras.serving.grpc_client`; gRPC adds +-20 % jitter to each pause)
    and urllib3's ``Retry`` on the ``requests`` session (:mod:`~mdgru_keras.serving.rest_client`).
    """

    max_attempts: int = 3
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(
                f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT} (gRPC's limit), got {self.max_attempts}"
            )
        if not self.backoff_s > 0:
            raise ValueError(f"backoff_s must be > 0, got {self.backoff_s}")

    @property
    def retries(self) -> int:
        return self.max_attempts - 1

    def pause_s(self, retry: int) -> float:
        """The pause before retry number ``retry`` (1: the first retry, after the first attempt failed)."""
        return self.backoff_s * BACKOFF_MULTIPLIER ** (retry - 1)

    @property
    def max_pause_s(self) -> float:
        """The longest pause (before the last retry)."""
        return self.pause_s(max(self.retries, 1))

    def gave_up(self, server: str, what: str, attempts: int, elapsed_s: float, problem: str) -> ServingError:
        """The one-line ``UNAVAILABLE`` error after ``attempts`` tries that found the server unavailable."""
        return ServingError(
            "UNAVAILABLE",
            f"{server} unavailable for {what} after {attempts} attempt{'s' * (attempts != 1)} in {elapsed_s:.1f} s: "
            f"{problem}",
        )


def is_lossless_int16(volume: np.ndarray) -> bool:
    """True when every value of ``volume`` is an integer in the int16 range (so int16 loses nothing)."""
    volume = np.asarray(volume)
    if volume.dtype == np.int16:
        return True
    if volume.dtype.kind not in "iubf":
        return False
    if volume.size == 0:
        return True
    low, high = volume.min(), volume.max()  # a NaN propagates and fails the comparison below
    if not (low >= -32768 and high <= 32767):
        return False
    if volume.dtype.kind != "f":
        return True
    return bool(np.array_equal(volume, np.rint(volume)))


def localize_inputs(
    volume: np.ndarray, voxel_to_world: np.ndarray, signature: str | None = None
) -> tuple[str, dict[str, np.ndarray]]:
    """Choose the signature and build its inputs.

    With ``signature=None`` a volume whose values are all int16 integers goes through ``localize_int16``
    (half the bytes of float32, same result), anything else as float32 through ``serving_default``.
    ``localize_int16`` demands a lossless int16 volume; other signatures get float32.
    """
    volume = np.asarray(volume)
    if signature is None:
        signature = INT16_SIGNATURE if is_lossless_int16(volume) else DEFAULT_SIGNATURE
    if signature == INT16_SIGNATURE:
        if not is_lossless_int16(volume):
            raise ValueError(f"signature {INT16_SIGNATURE!r} needs integer volume values in [-32768, 32767]")
        volume = volume.astype(np.int16, copy=False)
    else:
        volume = volume.astype(np.float32, copy=False)
    return signature, {"volume": volume, "voxel_to_world": np.asarray(voxel_to_world, dtype=np.float64)}


def decode_strings(array: np.ndarray) -> np.ndarray:
    """Bytes arrays (TF strings) -> NumPy ``str`` arrays (UTF-8); other arrays unchanged."""
    if array.dtype.kind == "S" or (array.dtype == object and all(isinstance(x, bytes) for x in array.flat)):
        return np.vectorize(lambda b: b.decode("utf-8", errors="replace"), otypes=[str])(array).astype(str)
    if array.dtype == object:
        return array.astype(str)
    return array


class LocalizationClient(ABC):
    """What the gRPC and REST clients share: ``localize`` on top of a generic ``predict``."""

    server: str
    model_name: str

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray], signature: str = DEFAULT_SIGNATURE) -> dict[str, np.ndarray]:
        """Run ``signature`` of the served model on named NumPy ``inputs``; outputs by name (strings as ``str``)."""

    def localize(
        self, volume: np.ndarray, voxel_to_world: np.ndarray, signature: str | None = None
    ) -> dict[str, np.ndarray]:
        """Landmarks of one scan: ``volume`` [X,Y,Z] (RAS voxel order), ``voxel_to_world`` 4x4 (RAS mm).

        Returns the contract's outputs: ``landmark_names`` str [K], ``world_mm``, ``voxel``,
        ``coarse_world_mm``, ``coarse_voxel`` float64 [K,3], ``confidence`` float32 [K], ``flip_disagreement_mm``
        float64 [K] (``coarse``: a subset).
        """
        signature, inputs = localize_inputs(volume, voxel_to_world, signature)
        return self.predict(inputs, signature)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> LocalizationClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def connect(server: str, model_name: str = DEFAULT_MODEL_NAME, **options: Any) -> LocalizationClient:
    """A client for ``server``: ``HOST:PORT`` or ``grpc://HOST:PORT`` for gRPC, ``http://HOST:PORT`` for REST.

    ``options`` go to :class:`mdgru_keras.serving.grpc_client.GrpcLocalizationClient` or
    :class:`mdgru_keras.serving.rest_client.RestLocalizationClient` (``timeout_s``, ``max_attempts``,
    ``backoff_s`` (:class:`RetryPolicy`), ...).
    """
    if server.startswith(("http://", "https://")):
        from mdgru_keras.serving.rest_client import RestLocalizationClient

        return RestLocalizationClient(server, model_name, **options)
    from mdgru_keras.serving.grpc_client import GrpcLocalizationClient

    return GrpcLocalizationClient(server.removeprefix("grpc://"), model_name, **options)
