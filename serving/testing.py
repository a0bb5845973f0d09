"""A tiny SavedModel with the serving contract's signatures, for testing servers and clients.

The real export (the two-stage MD-GRU localizer) takes minutes to build and seconds per call; the servers and
clients in :mod:`serving` are generic over any SavedModel, so their tests run against this stand-in instead.
It has exactly the signatures and tensor names of docs/ARCHITECTURE.md ("The exported SavedModel"):

* ``serving_default(volume: float32 [X,Y,Z], voxel_to_world: float64 [4,4])`` ->
  ``landmark_names`` string [K], ``world_mm``, ``voxel``, ``coarse_world_mm``, ``coarse_voxel`` float64 [K,3],
  ``confidence`` float32 [K];
* ``localize_int16``: the same with an int16 ``volume``;
* ``coarse``: the same inputs; ``landmark_names``, ``coarse_world_mm``, ``coarse_voxel``, ``confidence``.

"Landmark" ``k`` is the ``k``-th brightest voxel; its coarse estimate is the centre of its 4^3 block (as if
seen at stride 4). Like the real model it validates its inputs with ``tf.debugging`` asserts (a NaN volume,
a singular affine and a volume with fewer than K voxels raise ``InvalidArgumentError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from mdgru_keras.geometry import voxel_to_world_tf

TOY_LANDMARKS: tuple[str, ...] = ("AC", "PC", "infracollicular_sulcus")
COARSE_STRIDE = 4


class ToyLocalizer(tf.Module):
    """Brightest-voxel "localizer" with the contract's three signatures."""

    def __init__(self, landmark_names: Sequence[str] = TOY_LANDMARKS) -> None:
        super().__init__(name="toy_localizer")
        self.landmark_names = tf.constant(list(landmark_names), dtype=tf.string)
        self.num_landmarks = len(landmark_names)

    def _validate(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> list[tf.Operation]:
        linear = voxel_to_world[:3, :3]
        return [
            tf.debugging.assert_all_finite(volume, "volume contains NaN or Inf values"),
            tf.debugging.assert_all_finite(voxel_to_world, "voxel_to_world contains NaN or Inf values"),
            tf.debugging.assert_greater(
                tf.abs(tf.linalg.det(linear)),
                tf.constant(1e-9, tf.float64),
                message="voxel_to_world is singular (its 3x3 linear part has determinant 0)",
            ),
            tf.debugging.assert_greater_equal(
                tf.size(volume),
                self.num_landmarks,
                message=f"volume has fewer voxels than the {self.num_landmarks} landmarks",
            ),
        ]

    def _localize(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """``volume`` float32 [X,Y,Z], ``voxel_to_world`` float64 [4,4] -> the full contract's outputs."""
        with tf.control_dependencies(self._validate(volume, voxel_to_world)):
            values, flat_index = tf.math.top_k(tf.reshape(volume, [-1]), k=self.num_landmarks)
        voxel = tf.cast(tf.transpose(tf.unravel_index(flat_index, tf.shape(volume, out_type=tf.int32))), tf.float64)
        coarse_voxel = tf.floor(voxel / COARSE_STRIDE) * COARSE_STRIDE + (COARSE_STRIDE - 1) / 2
        return {
            "landmark_names": tf.identity(self.landmark_names),
            "world_mm": voxel_to_world_tf(voxel, voxel_to_world),
            "voxel": voxel,
            "coarse_world_mm": voxel_to_world_tf(coarse_voxel, voxel_to_world),
            "coarse_voxel": coarse_voxel,
            "confidence": tf.sigmoid(values),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32, name="volume"),
            tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world"),
        ]
    )
    def serving_default(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._localize(volume, voxel_to_world)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.int16, name="volume"),
            tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world"),
        ]
    )
    def localize_int16(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._localize(tf.cast(volume, tf.float32), voxel_to_world)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32, name="volume"),
            tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world"),
        ]
    )
    def coarse(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = self._localize(volume, voxel_to_world)
        return {name: outputs[name] for name in ("landmark_names", "coarse_world_mm", "coarse_voxel", "confidence")}


def save_toy_localizer(export_dir: str | Path, landmark_names: Sequence[str] = TOY_LANDMARKS) -> Path:
    """Write the toy localizer as a SavedModel to ``export_dir`` (e.g. ``BASE/mdgru/1``); returns the path."""
    module = ToyLocalizer(landmark_names)
    signatures = {
        "serving_default": module.serving_default.get_concrete_function(),
        "localize_int16": module.localize_int16.get_concrete_function(),
        "coarse": module.coarse.get_concrete_function(),
    }
    export_dir = Path(export_dir)
    tf.saved_model.save(module, str(export_dir), signatures=signatures)
    return export_dir
