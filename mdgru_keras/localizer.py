"""The two-stage localization as one TensorFlow function, used by predict, evaluate and export alike.

``TwoStageLocalizer(coarse_model, fine_model, config)`` maps a volume ``[X, Y, Z]`` float32 (RAS voxel order,
already at ``config.spacing_mm``) to the voxel coordinates of the config's K landmarks:

1. preprocess: ``[X, Y, Z, 2]`` (volume and its high-pass, each z-normalized over the whole volume).
2. coarse: the central ``P^3`` region (``P = config.coarse.padded_size``; zero-padded where the volume is
   smaller, the central part where it is larger: ``geometry.centered_window_origin``) -> coarse model ->
   per-axis softmax -> ``geometry.decode_axis_tf`` with ``factor = config.coarse.input_stride`` -> coarse voxel.
3. fine: one ``W^3`` window per landmark, centred on its coarse voxel (``geometry.window_origin_around_tf``,
   zero-padded outside the volume), all K windows as one batch (in chunks of ``fine_batch_size``) ->
   fine model with ``landmark_index = arange(K)`` -> softmax -> decode (``factor = 1``) -> voxel.

Decoding: ``voxel`` / ``coarse_voxel`` use the parabola refinement when ``config.parabola`` is true and the
plain argmax otherwise; both variants are always returned too (``*_argmax``, ``*_parabola``), which are the
rows of the paper's Table 1a. The fine windows are centred on ``coarse_voxel``.

Confidence: per axis the probability mass of the peak class and its two neighbours
(``geometry.peak_mass_tf``), multiplied over the three axes: the network's probability that the landmark lies
within one class of the decoded position on every axis (assuming independent axes). In ``[0, 1]``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mdgru_keras import geometry
from mdgru_keras.config import Config
from mdgru_keras.networks import AXES, stage_classes
from mdgru_keras.preprocessing import preprocess


class TwoStageLocalizer(tf.Module):
    """Coarse-to-fine localization of ``config.landmarks`` in one volume (see the module docstring).

    Call it with a float32 volume ``[X, Y, Z]``; it returns a dict of tensors (K landmarks, C classes):

    ========================== =============== ===============================================================
    key                        shape / dtype   meaning
    ========================== =============== ===============================================================
    ``voxel``                  [K, 3] float32  final position in the input volume's voxels
    ``voxel_argmax``           [K, 3] float32  fine stage, argmax decoding
    ``voxel_parabola``         [K, 3] float32  fine stage, argmax + parabola refinement
    ``coarse_voxel``           [K, 3] float32  coarse position (centre of the fine windows)
    ``coarse_voxel_argmax``    [K, 3] float32  coarse stage, argmax decoding
    ``coarse_voxel_parabola``  [K, 3] float32  coarse stage, parabola decoding
    ``confidence``             [K] float32     fine-stage confidence (module docstring)
    ``coarse_confidence``      [K] float32     coarse-stage confidence
    ``probabilities_{x,y,z}``  [K, C] float32  fine per-axis class probabilities
    ``coarse_probabilities_*`` [K, Cc] float32 coarse per-axis class probabilities
    ``window_origin_voxel``    [K, 3] int32    origin of each fine window in the volume
    ``coarse_origin_voxel``    [3] int32       origin of the coarse ``P^3`` region in the volume
    ========================== =============== ===============================================================

    Args:
        coarse_model, fine_model: from :func:`mdgru_keras.networks.build_coarse_model` / ``build_fine_model``
            (or loaded), for the same ``config``.
        config: the preset both models were built with.
        fine_batch_size: at most this many fine windows go through the fine network at once (memory bound of
            the paper preset); ``None``: all K at once.
    """

    def __init__(
        self,
        coarse_model: keras.Model,
        fine_model: keras.Model,
        config: Config,
        fine_batch_size: int | None = None,
        name: str | None = "two_stage_localizer",
    ) -> None:
        super().__init__(name=name)
        self.coarse_model = coarse_model
        self.fine_model = fine_model
        self.config = config
        self.num_landmarks = config.num_landmarks
        self.fine_batch_size = min(fine_batch_size or self.num_landmarks, self.num_landmarks)
        # a (non-trainable) variable so that the names are saved with the module
        self.landmark_names = tf.Variable(list(config.landmarks), dtype=tf.string, trainable=False, name="landmarks")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="volume")])
    def __call__(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.localize(volume)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="volume")])
    def coarse(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        """The coarse stage only (its ``coarse_*`` outputs)."""
        features = self._preprocess(volume)
        return self._coarse_stage(features)

    # -----------------------------------------------------------------------------------------------------

    def localize(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        """The whole two-stage localization (plain TF; ``__call__`` is its compiled form)."""
        features = self._preprocess(volume)
        result = self._coarse_stage(features)
        result.update(self._fine_stage(features, result["coarse_voxel"]))
        return result

    def _preprocess(self, volume: tf.Tensor) -> tf.Tensor:
        config = self.config
        features = preprocess(volume, config.spacing_mm, config.highpass_sigma_mm)
        return tf.ensure_shape(features, [None, None, None, 2])

    def _coarse_stage(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        config = self.config
        size, stride = config.coarse.padded_size, config.coarse.input_stride
        origin = geometry.centered_window_origin_tf(tf.shape(features)[:3], size)
        region = geometry.crop_with_padding_tf(features, origin, (size, size, size))
        logits = self.coarse_model({"volume": region[None]}, training=False)
        probabilities = {axis: tf.nn.softmax(logits[axis][0], axis=-1) for axis in AXES}  # [K, Cc]
        decoded = _decode(probabilities, config.superresolution, stride, origin[None, :])
        result = {
            "coarse_voxel": decoded["parabola"] if config.parabola else decoded["argmax"],
            "coarse_voxel_argmax": decoded["argmax"],
            "coarse_voxel_parabola": decoded["parabola"],
            "coarse_confidence": decoded["confidence"],
            "coarse_origin_voxel": origin,
        }
        result.update({f"coarse_probabilities_{axis}": probabilities[axis] for axis in AXES})
        return result

    def _fine_stage(self, features: tf.Tensor, coarse_voxel: tf.Tensor) -> dict[str, tf.Tensor]:
        config = self.config
        size = config.fine.window_size
        origins = geometry.window_origin_around_tf(coarse_voxel, size)  # [K, 3]
        windows = tf.map_fn(
            lambda origin: geometry.crop_with_padding_tf(features, origin, (size, size, size)),
            origins,
            fn_output_signature=tf.TensorSpec([size, size, size, 2], tf.float32),
        )  # [K, W, W, W, 2]
        probabilities = self._fine_probabilities(windows)
        decoded = _decode(probabilities, config.superresolution, 1, origins)
        result = {
            "voxel": decoded["parabola"] if config.parabola else decoded["argmax"],
            "voxel_argmax": decoded["argmax"],
            "voxel_parabola": decoded["parabola"],
            "confidence": decoded["confidence"],
            "window_origin_voxel": origins,
        }
        result.update({f"probabilities_{axis}": probabilities[axis] for axis in AXES})
        return result

    def _fine_probabilities(self, windows: tf.Tensor) -> dict[str, tf.Tensor]:
        """Fine softmaxes ``{axis: [K, C]}`` of the K windows, ``fine_batch_size`` at a time."""
        k, chunk = self.num_landmarks, self.fine_batch_size
        index = tf.range(k, dtype=tf.int32)
        if chunk >= k:
            logits = self.fine_model({"window": windows, "landmark_index": index}, training=False)
            return {axis: tf.nn.softmax(logits[axis], axis=-1) for axis in AXES}
        chunks = -(-k // chunk)
        pad = chunks * chunk - k  # the last chunk is filled up with copies of landmark 0, dropped below
        windows = tf.concat([windows, tf.repeat(windows[:1], pad, axis=0)], axis=0)
        index = tf.concat([index, tf.zeros([pad], tf.int32)], axis=0)
        size = self.config.fine.window_size
        windows = tf.reshape(windows, [chunks, chunk, size, size, size, 2])
        index = tf.reshape(index, [chunks, chunk])

        def run(args: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
            chunk_logits = self.fine_model({"window": args[0], "landmark_index": args[1]}, training=False)
            return {axis: tf.nn.softmax(chunk_logits[axis], axis=-1) for axis in AXES}

        classes = stage_classes(self.config, "fine")
        spec = {axis: tf.TensorSpec([chunk, c], tf.float32) for axis, c in zip(AXES, classes)}
        stacked = tf.map_fn(run, (windows, index), fn_output_signature=spec, parallel_iterations=1)
        return {axis: tf.reshape(stacked[axis], [chunks * chunk, -1])[:k] for axis in AXES}


def _decode(
    probabilities: dict[str, tf.Tensor], superresolution: int, factor: int, origin_voxel: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Argmax and parabola volume voxels ``[K, 3]`` and the confidence ``[K]`` of per-axis softmaxes ``[K, C]``."""
    decoded = {}
    for name, parabola in (("argmax", False), ("parabola", True)):
        window_voxel = tf.stack(
            [geometry.decode_axis_tf(probabilities[axis], superresolution, factor, parabola) for axis in AXES],
            axis=-1,
        )
        decoded[name] = geometry.window_to_volume_voxel_tf(window_voxel, origin_voxel)
    mass = tf.stack([geometry.peak_mass_tf(probabilities[axis]) for axis in AXES], axis=-1)
    decoded["confidence"] = tf.reduce_prod(mass, axis=-1)
    return decoded
