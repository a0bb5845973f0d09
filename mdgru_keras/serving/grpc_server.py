"""An in-process gRPC server speaking TF Serving's own API, on top of any SavedModel.

It implements ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
``tensorflow.serving.ModelService`` (``GetModelStatus``) from ``tensorflow-serving-api``'s protos, so the
same clients talk to it and to ``tensorflow_model_server``. It is a development server, meant for tests and
for users without Docker (production: the official TensorFlow Serving image, see ``serving/README.md``); it
listens on loopback only. From the command line (gRPC, and REST from :mod:`mdgru_keras.serving.rest_server`)::

    mdgru-localize serve --model export/mdgru --grpc-port 8500 --rest-port 8501

Malformed requests get ``INVALID_ARGUMENT`` with a message (see :class:`mdgru_keras.serving.servable.Servable`); an
unexpected failure is ``INTERNAL``; the server keeps serving either way.
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mdgru_keras.serving import DEFAULT_MODEL_NAME, MAX_MESSAGE_BYTES, ServingError
from mdgru_keras.serving.servable import Servable
from mdgru_keras.serving.server_common import check_loopback, servable_for, signature_def_map


def tensor_proto_to_array(name: str, proto: Any) -> np.ndarray:
    """A request TensorProto -> NumPy, ``INVALID_ARGUMENT`` when it does not decode."""
    try:
        return tf.make_ndarray(proto)
    except Exception as error:  # malformed content, unknown dtype, size mismatch
        raise ServingError("INVALID_ARGUMENT", f"input {name!r} is not a valid TensorProto: {error}") from error


def _requested_version(model_spec: Any) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


def _abort(context: grpc.ServicerContext, error: ServingError) -> None:
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``Predict`` and ``GetModelMetadata`` over one :class:`Servable` (Classify/Regress: UNIMPLEMENTED)."""

    def __init__(self, servable: Servable) -> None:
        self.servable = servable

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        servable = self.servable
        servable.check_model(request.model_spec.name, _requested_version(request.model_spec))
        signature_name = request.model_spec.signature_name or "serving_default"
        inputs = {name: tensor_proto_to_array(name, proto) for name, proto in request.inputs.items()}
        outputs = servable.predict(signature_name, inputs, request.output_filter)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.model_name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return response

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            return self._predict(request)
        except ServingError as error:
            failure = error
        except Exception as error:  # never let a request kill the handler thread silently
            failure = ServingError("INTERNAL", f"{type(error).__name__}: {error}")
        _abort(context, failure)  # raises; outside the try so the abort itself is not caught

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            self.servable.check_model(request.model_spec.name, _requested_version(request.model_spec))
            unsupported = [field for field in request.metadata_field if field != "signature_def"]
            if unsupported or not request.metadata_field:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"Metadata field {unsupported or '(none)'} is not supported; ask for 'signature_def'",
                )
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = self.servable.model_name
            response.model_spec.version.value = self.servable.version
            response.metadata["signature_def"].Pack(signature_def_map(self.servable))
            return response
        except ServingError as error:
            failure = error
        _abort(context, failure)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``GetModelStatus``: the one loaded version is AVAILABLE (HandleReloadConfigRequest: UNIMPLEMENTED)."""

    def __init__(self, servable: Servable) -> None:
        self.servable = servable

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            self.servable.check_model(request.model_spec.name, _requested_version(request.model_spec))
        except ServingError as error:
            _abort(context, error)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = self.servable.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


class GrpcServer:
    """TF Serving's gRPC API for one SavedModel on ``host:port`` (``port=0``: a free one, see ``.port``).

    Use as a context manager, or ``start()`` / ``stop()``. Message limits are raised to
    :data:`mdgru_keras.serving.MAX_MESSAGE_BYTES` so whole scans fit (gRPC's default is 4 MiB).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 16,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        servable: Servable | None = None,
    ) -> None:
        self.servable = servable = servable_for(model_path, model_name, servable)
        self.host = check_loopback(host)
        self._requested_port = port
        self.port: int | None = None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
        ]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(servable), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(servable), self._server)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> GrpcServer:
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            port = self._server.add_insecure_port(f"{host}:{self._requested_port}")
        except RuntimeError as error:  # grpcio raises when the port cannot be bound
            raise OSError(f"cannot listen on {host}:{self._requested_port}: {error}") from error
        if port == 0:
            raise OSError(f"cannot listen on {host}:{self._requested_port}")
        self.port = port
        self._server.start()
        return self

    def stop(self, grace_s: float | None = 1.0) -> None:
        self._server.stop(grace_s).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
