"""gRPC client for TF Serving's ``PredictionService``.

Servers: ``tensorflow_model_server``, or :mod:`mdgru_keras.serving.grpc_server` (``mdgru-localize serve``).

::

    client = GrpcLocalizationClient("127.0.0.1:8500", timeout_s=120)
    result = client.localize(volume, voxel_to_world)   # dict of NumPy arrays, see LocalizationClient.localize

Each call has one overall ``timeout_s``; a call that finds the server ``UNAVAILABLE`` (not up yet, restarting,
wrong port) is retried up to ``max_attempts`` times in all with exponential backoff, within that timeout
(:class:`mdgru_keras.serving.RetryPolicy`). Other errors are not retried. gRPC itself retries, by the retry
policy in the channel's service config (:func:`service_config`). Every failure is a
:class:`mdgru_keras.serving.ServingError` (one line ``"CODE: message"``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from mdgru_keras.serving import (
    BACKOFF_MULTIPLIER,
    DEFAULT_MODEL_NAME,
    DEFAULT_SIGNATURE,
    MAX_MESSAGE_BYTES,
    LocalizationClient,
    RetryPolicy,
    ServingError,
)
from mdgru_keras.serving import decode_strings as _decode_strings


def _describe(info: Any) -> tuple[str, tuple[int, ...] | None]:
    """TensorInfo -> ``(dtype name, shape with -1 for unknown dims, or None for unknown rank)``."""
    shape = None if info.tensor_shape.unknown_rank else tuple(int(dim.size) for dim in info.tensor_shape.dim)
    return tf.as_dtype(info.dtype).name, shape


def describe_signatures(signature_defs: Any) -> dict[str, dict[str, dict[str, tuple[str, Any]]]]:
    """SignatureDef map -> ``{signature: {"inputs": {name: (dtype, shape)}, "outputs": {...}}}``."""
    return {
        name: {
            "inputs": {key: _describe(info) for key, info in sorted(signature.inputs.items())},
            "outputs": {key: _describe(info) for key, info in sorted(signature.outputs.items())},
        }
        for name, signature in sorted(signature_defs.items())
        if not name.startswith("__")
    }


SERVICE = "tensorflow.serving.PredictionService"


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON, e.g. ``"0.5s"``."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(retry: RetryPolicy) -> str:
    """The channel's service config (JSON): retry calls of TF Serving's services on ``UNAVAILABLE`` by ``retry``."""
    if retry.retries == 0:
        return json.dumps({})
    policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": _duration(retry.pause_s(1)),
        "maxBackoff": _duration(retry.max_pause_s),
        "backoffMultiplier": BACKOFF_MULTIPLIER,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": policy}]})


class GrpcLocalizationClient(LocalizationClient):
    """Talks to ``server`` (``HOST:PORT``, TF Serving's gRPC port, 8500 by default) about model ``model_name``.

    Args:
        timeout_s: overall deadline of one call, retries included.
        max_attempts: tries in all when the server is UNAVAILABLE (1: no retry; at most 5, gRPC's limit).
        backoff_s: pause before the first retry; doubled for each further one (:class:`RetryPolicy`).
        max_message_bytes: send/receive limit (gRPC's default of 4 MiB is too small for a scan).
        version: a model version to pin; ``None`` lets the server pick its newest.
    """

    def __init__(
        self,
        server: str = "127.0.0.1:8500",
        model_name: str = DEFAULT_MODEL_NAME,
        *,
        timeout_s: float = 120.0,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        version: int | None = None,
    ) -> None:
        self.retry = RetryPolicy(max_attempts, backoff_s)
        self.server = server
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.version = version
        backoff_ms = max(1, int(backoff_s * 1000))
        self._channel = grpc.insecure_channel(
            server,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.enable_retries", 1),
                ("grpc.service_config", service_config(self.retry)),
                ("grpc.service_config_disable_resolution", 1),  # no service config from DNS overrides ours
                # A request larger than this buffer (256 KiB by default, a 64^3 float32 scan is 1 MiB) would be
                # sent once and never retried.
                ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
                # gRPC's own reconnect backoff (1 s and up) would make early retries fail without trying.
                ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                ("grpc.min_reconnect_backoff_ms", backoff_ms),
                ("grpc.max_reconnect_backoff_ms", max(backoff_ms, 4000)),
            ],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _model_spec(self, spec: Any, signature: str | None = None) -> None:
        spec.name = self.model_name
        if signature is not None:
            spec.signature_name = signature
        if self.version is not None:
            spec.version.value = self.version

    def _call(self, method: Callable[..., Any], request: Any, what: str) -> Any:
        """``method(request)`` within the overall timeout (gRPC retries it on UNAVAILABLE); ServingError on failure."""
        start = time.monotonic()
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
            details = (error.details() if callable(getattr(error, "details", None)) else None) or str(error)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ServingError(code.name, f"{self.server}: no answer to {what} within {self.timeout_s:g} s")
        if code == grpc.StatusCode.UNAVAILABLE:  # gRPC gave up after the policy's attempts
            raise self.retry.gave_up(self.server, what, self.retry.max_attempts, time.monotonic() - start, details)
        raise ServingError(code.name, details)

    def predict(
        self,
        inputs: dict[str, np.ndarray],
        signature: str = DEFAULT_SIGNATURE,
        output_filter: Iterable[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run ``signature`` on ``inputs`` (sent in their own dtypes); outputs by name, strings as ``str``."""
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
        request.output_filter.extend(output_filter)
        response = self._call(self._stub.Predict, request, f"Predict({self.model_name}/{signature})")
        return {name: _decode_strings(tf.make_ndarray(proto)) for name, proto in response.outputs.items()}

    def metadata(self) -> dict[str, dict[str, dict[str, tuple[str, Any]]]]:
        """The served signatures: ``{signature: {"inputs": {name: (dtype, shape)}, "outputs": {...}}}``."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self._stub.GetModelMetadata, request, f"GetModelMetadata({self.model_name})")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return describe_signatures(signature_map.signature_def)
