"""Serving: gRPC and REST clients against TF Serving's API, served in-process (and by tensorflow_model_server).

The model is a small stand-in with exactly the contract's signatures (:mod:`mdgru_keras.serving.testing`); what is under
test are the servers and clients. Every endpoint test runs against the in-process servers and again against a
real ``tensorflow_model_server`` when that binary is on PATH.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from mdgru_keras.errors import InputError, one_line_tf_error
from mdgru_keras.geometry import affine_maps
from mdgru_keras.serving import (
    LOCALIZE_OUTPUTS,
    MAX_ATTEMPTS_LIMIT,
    RetryPolicy,
    ServingError,
    connect,
    decode_strings,
    is_lossless_int16,
    localize_inputs,
)
from mdgru_keras.serving.grpc_client import GrpcLocalizationClient
from mdgru_keras.serving.grpc_server import GrpcServer
from mdgru_keras.serving.rest_client import RestLocalizationClient
from mdgru_keras.serving.rest_server import RestServer
from mdgru_keras.serving.servable import Servable
from mdgru_keras.serving.testing import TOY_LANDMARKS, free_port, save_toy_localizer
from mdgru_keras.serving.testing import model_server as run_model_server
from serving.loadtest import main as loadtest_main
from serving.loadtest import run_load_test

SERVING_DIR = Path(__file__).resolve().parents[1] / "serving"
MODEL = "mdgru"


@dataclass
class Endpoints:
    kind: str
    grpc_address: str
    rest_url: str
    servable: Servable | None  # None for tensorflow_model_server


@pytest.fixture(scope="module")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("models") / MODEL
    save_toy_localizer(base / "1")
    return base


@pytest.fixture(scope="module")
def direct(model_base: Path) -> tf.Module:
    return tf.saved_model.load(str(model_base / "1"))


@pytest.fixture(scope="module")
def in_process(model_base: Path) -> Iterator[Endpoints]:
    servable = Servable(model_base, MODEL)
    with GrpcServer(servable=servable) as grpc_server, RestServer(servable=servable) as rest_server:
        yield Endpoints("in-process", grpc_server.address, rest_server.url, servable)


@pytest.fixture(scope="module")
def model_server(model_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    binary = shutil.which("tensorflow_model_server")
    if binary is None:
        pytest.skip("tensorflow_model_server is not on PATH (the in-process servers stand in for it)")
    # tensorflow_model_server has no bind-address flag (its gRPC port listens on all interfaces); the tests
    # only ever connect to 127.0.0.1.
    log_path = tmp_path_factory.mktemp("tfs") / "tensorflow_model_server.log"
    with run_model_server(model_base, MODEL, log_path, binary) as (grpc_address, rest_url):
        yield Endpoints("tensorflow_model_server", grpc_address, rest_url, None)


@pytest.fixture(params=["in-process", "tensorflow_model_server"])
def endpoints(request: pytest.FixtureRequest) -> Endpoints:
    return request.getfixturevalue("in_process" if request.param == "in-process" else "model_server")


def make_scan(shape: tuple[int, int, int] = (10, 12, 14), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float32 volume with distinct values, and an oblique, anisotropic voxel_to_world."""
    rng = np.random.default_rng(seed)
    volume = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32) / 7.0
    angle = 0.3
    rotation = affine_maps.rotation_matrix([0.0, 0.0, angle])
    voxel_to_world = np.eye(4)
    voxel_to_world[:3, :3] = rotation @ np.diag([0.9, 1.1, 1.3])
    voxel_to_world[:3, 3] = [-40.5, 12.25, 7.0]
    return volume, voxel_to_world


def direct_call(model: tf.Module, signature: str, volume: np.ndarray, voxel_to_world: np.ndarray) -> dict:
    outputs = model.signatures[signature](volume=tf.constant(volume), voxel_to_world=tf.constant(voxel_to_world))
    return {name: decode_strings(value.numpy()) for name, value in outputs.items()}


# (what to send, which signature the client must pick, which signature to call directly for the expectation)
CASES = {
    "float": (lambda v: v, None, "serving_default"),
    "integer-valued -> int16": (lambda v: np.round(v * 7).astype(np.float32), None, "localize_int16"),
    "coarse": (lambda v: v, "coarse", "coarse"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpc_results_equal_a_direct_call_of_the_savedmodel(endpoints: Endpoints, direct: tf.Module, case: str) -> None:
    prepare, signature, direct_signature = CASES[case]
    volume, voxel_to_world = make_scan()
    volume = prepare(volume)
    with GrpcLocalizationClient(endpoints.grpc_address, MODEL, timeout_s=30) as client:
        result = client.localize(volume, voxel_to_world, signature=signature)
    send = volume.astype(np.int16) if direct_signature == "localize_int16" else volume
    expected = direct_call(direct, direct_signature, send, voxel_to_world)
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].dtype == value.dtype, name
        np.testing.assert_array_equal(result[name], value, err_msg=name)
    if signature != "coarse":
        assert set(result) == set(LOCALIZE_OUTPUTS)
        assert list(result["landmark_names"]) == list(TOY_LANDMARKS)


@pytest.mark.parametrize("case", list(CASES))
def test_rest_results_equal_grpc_results(endpoints: Endpoints, case: str) -> None:
    prepare, signature, _ = CASES[case]
    volume, voxel_to_world = make_scan(seed=1)
    volume = prepare(volume)
    with connect(endpoints.grpc_address, MODEL) as grpc_client, connect(endpoints.rest_url, MODEL) as rest_client:
        assert isinstance(rest_client, RestLocalizationClient)
        via_grpc = grpc_client.localize(volume, voxel_to_world, signature=signature)
        via_rest = rest_client.localize(volume, voxel_to_world, signature=signature)
    assert set(via_rest) == set(via_grpc)
    for name, value in via_grpc.items():
        assert via_rest[name].dtype == value.dtype, name
        if value.dtype.kind == "U":
            np.testing.assert_array_equal(via_rest[name], value)
        else:
            np.testing.assert_allclose(via_rest[name], value, rtol=1e-6, atol=1e-9, err_msg=name)


def test_integer_valued_volumes_travel_as_int16(in_process: Endpoints) -> None:
    volume, voxel_to_world = make_scan(seed=2)
    counts = in_process.servable.request_counts
    before = counts["localize_int16"], counts["serving_default"]
    with connect(in_process.grpc_address, MODEL) as client:
        client.localize(np.round(volume), voxel_to_world)
        client.localize(volume + 0.25, voxel_to_world)
    assert (counts["localize_int16"], counts["serving_default"]) == (before[0] + 1, before[1] + 1)


def test_a_model_opened_again_is_loaded_again_only_when_its_files_changed(tmp_path: Path) -> None:
    """Servables of one unchanged version folder share the loaded SavedModel (TensorFlow keeps the memory of every
    load); a folder whose files were replaced is loaded anew, and answers as the new files say."""
    from mdgru_keras.serving.servable import LOADED_MODELS_KEPT, Servable

    save_toy_localizer(tmp_path / "toy" / "1")
    first, second = Servable(tmp_path / "toy"), Servable(tmp_path / "toy")
    assert second.model is first.model and second.request_counts is not first.request_counts
    volume, voxel_to_world = make_scan()
    before = first.predict("serving_default", {"volume": volume, "voxel_to_world": voxel_to_world})
    shutil.rmtree(tmp_path / "toy" / "1")
    save_toy_localizer(tmp_path / "toy" / "1", landmark_names=("P", "Q", "R"))  # other landmarks, the same path
    replaced = Servable(tmp_path / "toy")
    assert replaced.model is not first.model
    after = replaced.predict("serving_default", {"volume": volume, "voxel_to_world": voxel_to_world})
    assert list(before["landmark_names"]) == [name.encode() for name in TOY_LANDMARKS]
    assert list(after["landmark_names"]) == [b"P", b"Q", b"R"]
    # only the most recently used few are kept
    for index in range(LOADED_MODELS_KEPT):
        save_toy_localizer(tmp_path / f"other{index}" / "1")
        Servable(tmp_path / f"other{index}")
    assert Servable(tmp_path / "toy").model is not replaced.model


def test_localize_inputs_picks_the_signature_by_losslessness() -> None:
    voxel_to_world = np.eye(4)
    cases = [
        (np.zeros((2, 2, 2), np.int16), "localize_int16", np.int16),
        (np.full((2, 2, 2), -32768.0), "localize_int16", np.int16),
        (np.full((2, 2, 2), 12, np.int32), "localize_int16", np.int16),
        (np.full((2, 2, 2), 0.5, np.float32), "serving_default", np.float32),
        (np.full((2, 2, 2), 40000.0), "serving_default", np.float32),
        (np.full((2, 2, 2), 40000, np.int32), "serving_default", np.float32),
        (np.full((2, 2, 2), np.nan, np.float32), "serving_default", np.float32),
    ]
    for volume, signature, dtype in cases:
        chosen, inputs = localize_inputs(volume, voxel_to_world)
        assert (chosen, inputs["volume"].dtype) == (signature, dtype), volume.ravel()[0]
        assert is_lossless_int16(volume) == (signature == "localize_int16")
        np.testing.assert_array_equal(inputs["volume"].astype(volume.dtype), volume)
        assert inputs["voxel_to_world"].dtype == np.float64
    with pytest.raises(ValueError, match="int16"):
        localize_inputs(np.full((2, 2, 2), 0.5), voxel_to_world, signature="localize_int16")


def test_metadata_and_status_describe_the_contract(endpoints: Endpoints) -> None:
    with connect(endpoints.grpc_address, MODEL) as grpc_client, connect(endpoints.rest_url, MODEL) as rest_client:
        via_grpc = grpc_client.metadata()
        assert rest_client.metadata() == via_grpc
    assert set(via_grpc) == {"serving_default", "localize_int16", "coarse"}
    assert via_grpc["serving_default"]["inputs"] == {
        "volume": ("float32", (-1, -1, -1)),
        "voxel_to_world": ("float64", (4, 4)),
    }
    assert via_grpc["localize_int16"]["inputs"]["volume"] == ("int16", (-1, -1, -1))
    outputs = via_grpc["serving_default"]["outputs"]
    assert {name: dtype for name, (dtype, _) in outputs.items()} == {
        "landmark_names": "string",
        "world_mm": "float64",
        "voxel": "float64",
        "coarse_world_mm": "float64",
        "coarse_voxel": "float64",
        "confidence": "float32",
        "flip_disagreement_mm": "float64",
    }
    assert set(via_grpc["coarse"]["outputs"]) == {"landmark_names", "coarse_world_mm", "coarse_voxel", "confidence"}
    status = requests.get(f"{endpoints.rest_url}/v1/models/{MODEL}", timeout=10)
    assert status.status_code == 200
    assert status.json()["model_version_status"][0]["state"] == "AVAILABLE"
    missing = requests.get(f"{endpoints.rest_url}/v1/models/no_such_model", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]


# ---------------------------------------------------------------------------------------------------------
# malformed requests: a clear INVALID_ARGUMENT, and the server keeps serving

VOLUME, AFFINE = make_scan(shape=(6, 7, 8), seed=3)
NAN_VOLUME = VOLUME.copy()
NAN_VOLUME[1, 2, 3] = np.nan
SINGULAR = AFFINE.copy()
SINGULAR[:3, 2] = SINGULAR[:3, 0]

# name -> (signature, inputs, what the in-process server's message mentions)
MALFORMED = {
    "float64 volume": ("serving_default", {"volume": VOLUME.astype(np.float64), "voxel_to_world": AFFINE}, "dtype"),
    "float32 volume to localize_int16": ("localize_int16", {"volume": VOLUME, "voxel_to_world": AFFINE}, "dtype"),
    "rank-2 volume": ("serving_default", {"volume": VOLUME[0], "voxel_to_world": AFFINE}, "rank 2"),
    "rank-4 volume": ("serving_default", {"volume": VOLUME[None], "voxel_to_world": AFFINE}, "rank 4"),
    "3x3 affine": ("serving_default", {"volume": VOLUME, "voxel_to_world": AFFINE[:3, :3]}, "voxel_to_world"),
    "NaN volume": ("serving_default", {"volume": NAN_VOLUME, "voxel_to_world": AFFINE}, "NaN"),
    "singular affine": ("serving_default", {"volume": VOLUME, "voxel_to_world": SINGULAR}, "singular"),
    "missing affine": ("serving_default", {"volume": VOLUME}, "missing input 'voxel_to_world'"),
    "unknown input": ("coarse", {"volume": VOLUME, "voxel_to_world": AFFINE, "mask": VOLUME}, "unexpected input"),
}


def assert_still_serving(endpoints: Endpoints) -> None:
    with connect(endpoints.grpc_address, MODEL, timeout_s=30) as client:
        assert client.localize(VOLUME, AFFINE)["world_mm"].shape == (len(TOY_LANDMARKS), 3)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_grpc_request_is_invalid_argument(endpoints: Endpoints, case: str) -> None:
    signature, inputs, mentions = MALFORMED[case]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    with grpc.insecure_channel(endpoints.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details()
    if endpoints.kind == "in-process":
        assert mentions in caught.value.details()
    assert_still_serving(endpoints)


@pytest.mark.parametrize("case", ["NaN volume", "singular affine", "rank-2 volume"])
def test_client_errors_are_one_clear_line(endpoints: Endpoints, case: str) -> None:
    signature, inputs, mentions = MALFORMED[case]
    for server in (endpoints.grpc_address, endpoints.rest_url):
        # not retried: with retries, the first pause alone would take 4 s or more
        with connect(server, MODEL, timeout_s=30, max_attempts=3, backoff_s=5.0) as client:
            tic = time.monotonic()
            with pytest.raises(ServingError) as caught:
                client.predict(inputs, signature)
            assert time.monotonic() - tic < 4.0
        error = caught.value
        assert error.code == "INVALID_ARGUMENT" and error.http_status == 400
        assert str(error).startswith("INVALID_ARGUMENT: ") and "\n" not in str(error)
        if endpoints.kind == "in-process" or case != "rank-2 volume":
            assert mentions in str(error), str(error)
    assert_still_serving(endpoints)


def test_unknown_signature_and_model_are_reported(endpoints: Endpoints) -> None:
    with connect(endpoints.grpc_address, MODEL) as client, pytest.raises(ServingError) as caught:
        client.predict({"volume": VOLUME, "voxel_to_world": AFFINE}, "no_such_signature")
    assert caught.value.code == "FAILED_PRECONDITION" and "no_such_signature" in str(caught.value)
    with connect(endpoints.grpc_address, "no_such_model") as client, pytest.raises(ServingError) as caught:
        client.localize(VOLUME, AFFINE)
    assert caught.value.code == "NOT_FOUND"
    assert_still_serving(endpoints)


def _rest_body(signature: str, inputs: dict) -> bytes:
    return json.dumps({"signature_name": signature, "inputs": inputs}).encode()


REST_VOLUME, REST_AFFINE = VOLUME.tolist(), AFFINE.tolist()
MALFORMED_REST = {
    "not JSON": b'{"inputs": [1, 2',
    "no inputs": json.dumps({"signature_name": "serving_default"}).encode(),
    "rank-2 volume": _rest_body("serving_default", {"volume": REST_VOLUME[0], "voxel_to_world": REST_AFFINE}),
    "NaN volume": _rest_body("serving_default", {"volume": NAN_VOLUME.tolist(), "voxel_to_world": REST_AFFINE}),
    "singular affine": _rest_body("serving_default", {"volume": REST_VOLUME, "voxel_to_world": SINGULAR.tolist()}),
    "missing affine": _rest_body("serving_default", {"volume": REST_VOLUME}),
    "fractions to int16": _rest_body("localize_int16", {"volume": REST_VOLUME, "voxel_to_world": REST_AFFINE}),
    "out of int16 range": _rest_body(
        "localize_int16", {"volume": np.full((3, 3, 3), 40000).tolist(), "voxel_to_world": REST_AFFINE}
    ),
    "strings as volume": _rest_body("serving_default", {"volume": [[["a"]]], "voxel_to_world": REST_AFFINE}),
    "ragged volume": _rest_body("serving_default", {"volume": [[[1.0, 2.0], [3.0]]], "voxel_to_world": REST_AFFINE}),
}


@pytest.mark.parametrize("case", list(MALFORMED_REST))
def test_malformed_rest_request_is_400_with_a_message(endpoints: Endpoints, case: str) -> None:
    url = f"{endpoints.rest_url}/v1/models/{MODEL}:predict"
    answer = requests.post(url, data=MALFORMED_REST[case], timeout=30)
    assert answer.status_code == 400, answer.text
    assert isinstance(answer.json()["error"], str) and answer.json()["error"]
    valid = _rest_body("serving_default", {"volume": REST_VOLUME, "voxel_to_world": REST_AFFINE})
    good = requests.post(url, data=valid, timeout=30)
    assert good.status_code == 200 and len(good.json()["outputs"]["world_mm"]) == len(TOY_LANDMARKS)


# ---------------------------------------------------------------------------------------------------------
# retries, timeouts, message sizes


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_closed_port_fails_after_bounded_retries_within_the_timeout(protocol: str) -> None:
    server = f"127.0.0.1:{free_port()}" if protocol == "grpc" else f"http://127.0.0.1:{free_port()}"
    client = connect(server, MODEL, timeout_s=10.0, max_attempts=3, backoff_s=0.1)
    tic = time.monotonic()
    with client, pytest.raises(ServingError) as caught:
        client.localize(VOLUME, AFFINE)
    elapsed = time.monotonic() - tic
    assert caught.value.code == "UNAVAILABLE"
    message = str(caught.value)
    assert message.startswith(f"UNAVAILABLE: {server} unavailable for ") and "after 3 attempts in " in message
    assert "\n" not in message and ("refused" in message.lower() or "failed to connect" in message.lower())
    # the two pauses, 0.1 s and 0.2 s (gRPC: +-20 % jitter), were taken, and it gave up long before the timeout
    assert 0.8 * (0.1 + 0.2) <= elapsed < 5.0


def test_retry_policy_limits_and_pauses() -> None:
    policy = RetryPolicy(max_attempts=4, backoff_s=0.25)
    assert [policy.pause_s(retry) for retry in (1, 2, 3)] == [0.25, 0.5, 1.0] and policy.max_pause_s == 1.0
    for bad in ({"max_attempts": 0}, {"max_attempts": MAX_ATTEMPTS_LIMIT + 1}, {"backoff_s": 0.0}):
        with pytest.raises(ValueError, match="max_attempts|backoff_s"):
            RetryPolicy(**bad)
    for server in ("127.0.0.1:1", "http://127.0.0.1:1"):  # refused by both clients alike
        with pytest.raises(ValueError, match="gRPC's limit"):
            connect(server, MODEL, max_attempts=8)


def reset_connection(connection: socket.socket) -> None:
    """Drop a connection with a reset, as a port whose server is going down or not listening yet."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def answer_503(connection: socket.socket) -> None:
    """Read one HTTP request and answer 503 Service Unavailable, as a proxy before its server is up."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(1 << 16)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), 0)  # fmt: skip
    while len(body) < length:
        body += connection.recv(1 << 20)
    answer = b'{"error": "not up yet"}'
    connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer))
    connection.close()


class LateServer:
    """A port whose first connection gets ``first_answer`` (the server is not up yet), after which
    ``make_server(port)`` starts the real server on it: a client gets its answer only by trying again."""

    def __init__(
        self, make_server: Callable[[int], GrpcServer | RestServer], first_answer: Callable[[socket.socket], None]
    ) -> None:
        self.make_server, self.first_answer = make_server, first_answer
        self.server: GrpcServer | RestServer | None = None
        self.first_attempt = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._answer_first_then_serve, daemon=True)

    def _answer_first_then_serve(self) -> None:
        connection, _ = self._listener.accept()
        self.first_answer(connection)
        self._listener.close()
        self.first_attempt.set()
        self.server = self.make_server(self.port).start()

    def __enter__(self) -> LateServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.join(timeout=30)
        if self.server is not None:
            self.server.stop()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_retries_until_a_late_server_is_up(in_process: Endpoints, protocol: str) -> None:
    """gRPC: the first connection is reset; REST: the first request gets 503 (a connection reset after the
    request was sent is not retried over REST, as it could have been a timeout)."""
    servable = in_process.servable
    if protocol == "grpc":
        server_class, scheme, first_answer = GrpcServer, "", reset_connection
    else:
        server_class, scheme, first_answer = RestServer, "http://", answer_503
    # 1 MiB: more than gRPC's default retry buffer (256 KiB), beyond which a call would not be retried
    volume = np.zeros((64, 64, 64), np.float32)
    volume[5, 6, 7] = 3.0
    with LateServer(lambda port: server_class(servable=servable, port=port), first_answer) as late:
        with connect(f"{scheme}127.0.0.1:{late.port}", MODEL, timeout_s=20.0, max_attempts=5, backoff_s=0.1) as client:
            result = client.localize(volume, AFFINE)
        assert late.first_attempt.is_set()  # the first attempt was turned away: a retry got the answer
    np.testing.assert_array_equal(result["voxel"][0], [5, 6, 7])


def test_rest_client_gives_up_on_503_after_the_attempts() -> None:
    attempts = []

    def always_503(connection: socket.socket) -> None:
        attempts.append(1)
        answer_503(connection)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            always_503(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with connect(url, MODEL, timeout_s=10.0, max_attempts=3, backoff_s=0.1) as client:
            with pytest.raises(ServingError) as caught:
                client.localize(VOLUME, AFFINE)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert len(attempts) == 3
    assert str(caught.value).startswith(f"UNAVAILABLE: {url} unavailable for predict(")
    assert "after 3 attempts in " in str(caught.value) and str(caught.value).endswith(": HTTP 503: not up yet")


def test_a_whole_256_cubed_scan_fits_in_one_grpc_message(in_process: Endpoints, direct: tf.Module) -> None:
    volume = np.zeros((256, 256, 256), np.float32)  # 64 MiB as float32; gRPC's default limit is 4 MiB
    volume[200, 17, 99], volume[3, 250, 128], volume[128, 128, 5] = 3.0, 2.0, 1.0
    volume[0, 0, 0] = 0.5  # not an integer: goes as float32, not int16
    with connect(in_process.grpc_address, MODEL, timeout_s=120) as client:
        result = client.localize(volume, AFFINE)
    np.testing.assert_array_equal(result["voxel"], [[200, 17, 99], [3, 250, 128], [128, 128, 5]])
    np.testing.assert_allclose(result["world_mm"], direct_call(direct, "serving_default", volume, AFFINE)["world_mm"])


# ---------------------------------------------------------------------------------------------------------
# load test


def test_eight_concurrent_grpc_clients_fifty_requests_each(endpoints: Endpoints, capsys: pytest.CaptureFixture) -> None:
    result = run_load_test(endpoints.grpc_address, MODEL, clients=8, requests_per_client=50, shape=(16, 16, 16))
    with capsys.disabled():
        print(f"\n[{endpoints.kind}] {result.line()}")
    assert result.errors == []
    assert result.completed == 400
    assert 0 < result.percentile_ms(50) <= result.percentile_ms(99)


def test_loadtest_script(model_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary_path = tmp_path / "loadtest.json"
    argv = ["--saved-model", str(model_base), "--clients", "2", "--requests", "3", "--shape", "5", "6", "7"]
    assert loadtest_main([*argv, "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["completed"] == 6 and summary["errors"] == 0 and summary["shape"] == [5, 6, 7]
    assert "6/6 requests" in capsys.readouterr().out
    for refused in (["--server", "192.0.2.1:8500"], ["--saved-model", str(model_base), "--clients", "1000"]):
        with pytest.raises(SystemExit) as caught:
            loadtest_main(refused)
        assert caught.value.code == 2
    assert "loopback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# small parts


def test_servers_bind_loopback_only(in_process: Endpoints) -> None:
    for host in ("0.0.0.0", "192.0.2.1"):
        with pytest.raises(ValueError, match="loopback"):
            GrpcServer(servable=in_process.servable, host=host)
        with pytest.raises(ValueError, match="loopback"):
            RestServer(servable=in_process.servable, host=host)


def test_servable_needs_a_savedmodel(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no saved_model.pb"):
        Servable(tmp_path)
    with pytest.raises(InputError, match="no such directory"):
        Servable(tmp_path / "missing")


def test_newest_version_is_served(tmp_path: Path) -> None:
    save_toy_localizer(tmp_path / "mdgru" / "3", landmark_names=("old",))
    save_toy_localizer(tmp_path / "mdgru" / "12", landmark_names=("new",))
    servable = Servable(tmp_path / "mdgru")
    assert servable.version == 12
    outputs = servable.predict("serving_default", {"volume": VOLUME, "voxel_to_world": AFFINE})
    assert outputs["landmark_names"].tolist() == [b"new"]


def test_one_line_tf_error_condenses_a_real_tensorflow_error(direct: tf.Module) -> None:
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        direct_call(direct, "serving_default", VOLUME, SINGULAR)
    assert "\n" in caught.value.message  # TensorFlow's own message spans lines
    line = one_line_tf_error(caught.value.message)
    assert "\n" not in line and "Graph execution error" not in line and "{{node" not in line
    assert line.startswith("voxel_to_world is singular")


def test_models_config_serves_mdgru_from_models_mdgru() -> None:
    config = text_format.Parse((SERVING_DIR / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (MODEL, "/models/mdgru", "tensorflow")
