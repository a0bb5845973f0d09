"""One SavedModel version loaded for serving: what the in-process gRPC and REST servers share.

:class:`Servable` checks requests against the model's own SignatureDefs (input names, dtypes, ranks and
fixed dimensions), runs the signature, and turns every failure into a :class:`mdgru_keras.serving.ServingError` with a
gRPC status name, as TF Serving does: bad inputs and the model's own ``tf.debugging`` asserts
(``InvalidArgumentError``) are ``INVALID_ARGUMENT``, an unknown signature ``FAILED_PRECONDITION``, an unknown
model or version ``NOT_FOUND``. Nothing a client sends can take the server down.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from mdgru_keras.errors import InputError, one_line_tf_error
from mdgru_keras.serving import DEFAULT_MODEL_NAME, DEFAULT_SIGNATURE, LocalizationClient, ServingError, decode_strings

# tf.errors codes are the gRPC status codes: index -> name.
STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


def resolve_version_dir(model_path: str | Path) -> tuple[Path, int]:
    """``BASE/NAME`` (numeric version folders, newest wins, as in TF Serving) or one version folder itself.

    Returns ``(version_dir, version)``; a version folder not named by a number counts as version 1.
    """
    path = Path(model_path)
    if (path / "saved_model.pb").is_file():
        return path, int(path.name) if path.name.isdigit() else 1
    if not path.is_dir():
        raise InputError(path, "no such directory (expected a SavedModel or a folder of numbered versions)")
    versions = sorted(
        (int(child.name), child)
        for child in path.iterdir()
        if child.name.isdigit() and (child / "saved_model.pb").is_file()
    )
    if not versions:
        raise InputError(path, "no saved_model.pb here nor in a numbered version folder (e.g. 1/saved_model.pb)")
    version, version_dir = versions[-1]
    return version_dir, version


def read_signature_defs(version_dir: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of a SavedModel's ``serve`` graph, without TF-internal ones (``__saved_model_init_op``)."""
    saved_model = saved_model_pb2.SavedModel()
    path = version_dir / "saved_model.pb"
    try:
        saved_model.ParseFromString(path.read_bytes())
    except DecodeError as error:  # a damaged or truncated file, or not a SavedModel
        raise InputError(path, f"not a readable SavedModel ({error})") from None
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return {key: sig for key, sig in meta_graph.signature_def.items() if not key.startswith("__")}
    raise InputError(version_dir, "the SavedModel has no meta graph tagged 'serve'")


def describe_tensor(info: meta_graph_pb2.TensorInfo) -> str:
    """``float32 [?,?,?]`` for a TensorInfo."""
    dtype = tf.as_dtype(info.dtype).name
    if info.tensor_shape.unknown_rank:
        return f"{dtype} [any shape]"
    dims = ",".join("?" if dim.size < 0 else str(dim.size) for dim in info.tensor_shape.dim)
    return f"{dtype} [{dims}]"


def describe_signature(name: str, signature: meta_graph_pb2.SignatureDef) -> str:
    inputs = ", ".join(f"{key}: {describe_tensor(info)}" for key, info in sorted(signature.inputs.items()))
    return f"signature {name!r} takes {inputs}"


def dtype_name(dtype: np.dtype) -> str:
    if dtype.kind in "OSU":
        return "string"
    try:
        return tf.as_dtype(dtype).name
    except TypeError:
        return str(dtype)


def _shape_text(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(dim) for dim in shape) + "]"


# A SavedModel loaded again in the same process costs its memory again: TensorFlow keeps what every load of the
# two-stage graph builds (about 0.3 GB per load of a tiny-preset export, measured on 2026-12-06; the toy model of
# serving.testing: nothing). A process that opens one model many times (a notebook, a test suite, a service that
# makes a client per request) reuses the loaded one, as long as the files on disk are the same.
LOADED_MODELS_KEPT = 4
_loaded_models: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_loaded_models_lock = threading.Lock()


def _files_key(version_dir: Path) -> tuple:
    """What identifies a version folder's files: each file's relative path, size, inode and modification time."""
    keys = []
    for path in sorted(path for path in version_dir.rglob("*") if path.is_file()):
        stat = path.stat()
        keys.append((path.relative_to(version_dir).as_posix(), stat.st_size, stat.st_ino, stat.st_mtime_ns))
    return tuple(keys)


def load_saved_model(version_dir: Path) -> object:
    """``tf.saved_model.load(version_dir)``, or the object an earlier call loaded from the same, unchanged files
    (the :data:`LOADED_MODELS_KEPT` most recently used are kept). Raises what ``tf.saved_model.load`` raises."""
    key = (str(version_dir.resolve()), _files_key(version_dir))
    with _loaded_models_lock:
        if key in _loaded_models:
            _loaded_models.move_to_end(key)
            return _loaded_models[key]
    model = tf.saved_model.load(str(version_dir))
    with _loaded_models_lock:
        _loaded_models[key] = model
        while len(_loaded_models) > LOADED_MODELS_KEPT:
            _loaded_models.popitem(last=False)
    return model


class Servable:
    """A loaded SavedModel version; thread-safe ``predict`` over its signatures.

    Args:
        model_path: ``BASE/NAME`` with numbered version folders (the newest is served), or one version folder.
        model_name: the name clients address (``/v1/models/NAME``, ``ModelSpec.name``).
    """

    def __init__(self, model_path: str | Path, model_name: str = DEFAULT_MODEL_NAME) -> None:
        self.model_name = model_name
        self.version_dir, self.version = resolve_version_dir(model_path)
        self.signature_defs = read_signature_defs(self.version_dir)
        try:
            self.model = load_saved_model(self.version_dir)
        except Exception as error:  # damaged or missing variables: TensorFlow raises many kinds (even IndexError)
            message = error.message if isinstance(error, tf.errors.OpError) else str(error)
            raise InputError(
                self.version_dir, f"cannot load the SavedModel ({type(error).__name__}: {one_line_tf_error(message)})"
            ) from None
        self.functions = {name: self.model.signatures[name] for name in self.signature_defs}
        # Requests answered per signature (and "error"), for monitoring and tests.
        self.request_counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.request_counts[key] += 1

    def check_model(self, name: str, version: int | None = None) -> None:
        """``NOT_FOUND`` unless ``name`` (and ``version``, when given) is what this servable serves."""
        if name != self.model_name:
            raise ServingError(
                "NOT_FOUND", f"Servable not found for request: model {name!r} (serving {self.model_name!r})"
            )
        if version is not None and version != self.version:
            raise ServingError(
                "NOT_FOUND",
                f"Servable not found for request: {name!r} version {version} (serving version {self.version})",
            )

    def signature(self, signature_name: str) -> meta_graph_pb2.SignatureDef:
        signature_name = signature_name or DEFAULT_SIGNATURE
        if signature_name not in self.signature_defs:
            known = ", ".join(sorted(self.signature_defs))
            raise ServingError(
                "FAILED_PRECONDITION", f"Serving signature key {signature_name!r} not found (has: {known})"
            )
        return self.signature_defs[signature_name]

    def validate(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> None:
        """``INVALID_ARGUMENT`` for missing, unexpected, mistyped or misshapen inputs."""
        signature = self.signature(signature_name)
        missing = sorted(set(signature.inputs) - set(inputs))
        unexpected = sorted(set(inputs) - set(signature.inputs))
        if missing or unexpected:
            problems = [f"missing input {name!r}" for name in missing] + [
                f"unexpected input {name!r}" for name in unexpected
            ]
            raise ServingError(
                "INVALID_ARGUMENT", f"{'; '.join(problems)}; {describe_signature(signature_name, signature)}"
            )
        for name, info in sorted(signature.inputs.items()):
            value = inputs[name]
            expected = tf.as_dtype(info.dtype)
            actual = dtype_name(value.dtype)
            if actual != expected.name:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input {name!r} has dtype {actual}; {describe_signature(signature_name, signature)}",
                )
            if info.tensor_shape.unknown_rank:
                continue
            dims = [dim.size for dim in info.tensor_shape.dim]
            if value.ndim != len(dims) or any(want >= 0 and want != got for want, got in zip(dims, value.shape)):
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input {name!r} has shape {_shape_text(value.shape)} (rank {value.ndim}); "
                    f"{describe_signature(signature_name, signature)}",
                )

    def predict(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_filter: Iterable[str] = ()
    ) -> dict[str, np.ndarray]:
        """Run one signature on validated ``inputs``; outputs by name (all of them unless ``output_filter``)."""
        signature_name = signature_name or DEFAULT_SIGNATURE
        try:
            self.validate(signature_name, inputs)
            signature = self.signature_defs[signature_name]
            wanted = list(output_filter) or sorted(signature.outputs)
            unknown = [name for name in wanted if name not in signature.outputs]
            if unknown:
                raise ServingError(
                    "INVALID_ARGUMENT", f"output tensor alias not found in signature: {', '.join(unknown)}"
                )
            try:
                outputs = self.functions[signature_name](**{name: tf.constant(value) for name, value in inputs.items()})
            except tf.errors.OpError as error:
                raise ServingError(STATUS_NAMES[error.error_code], error.message) from error
            except (TypeError, ValueError) as error:
                raise ServingError("INVALID_ARGUMENT", str(error)) from error
            result = {name: outputs[name].numpy() for name in wanted}
        except ServingError:
            self._count("error")
            raise
        except Exception as error:  # a bug in the model or here: report it, keep serving
            self._count("error")
            raise ServingError("INTERNAL", f"{type(error).__name__}: {error}") from error
        self._count(signature_name)
        return result


class LocalLocalizationClient(LocalizationClient):
    """The :class:`mdgru_keras.serving.LocalizationClient` interface on a SavedModel loaded in this process (no server).

    ``predict --model`` uses it: the same requests, checks and ``ServingError`` codes as through a server.
    """

    def __init__(self, model_path: str | Path, model_name: str = DEFAULT_MODEL_NAME) -> None:
        self.servable = Servable(model_path, model_name)
        self.server = str(self.servable.version_dir)
        self.model_name = model_name

    def predict(self, inputs: dict[str, np.ndarray], signature: str = DEFAULT_SIGNATURE) -> dict[str, np.ndarray]:
        outputs = self.servable.predict(signature, inputs)
        return {name: decode_strings(value) for name, value in outputs.items()}
