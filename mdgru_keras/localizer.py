"""The two-stage localization as one TensorFlow function, used by predict, evaluate and export alike.

``TwoStageLocalizer(coarse_model, fine_model, config)`` maps a volume ``[X, Y, Z]`` float32 (RAS voxel order,
already at ``config.spacing_mm``) to the voxel coordinates of the config's K landmarks:

1. preprocess: ``[X, Y, Z, 2]`` (volume and its high-pass, each z-normalized over the whole volume).
2. coarse: the central ``P^3`` region (``P = config.coarse.padded_size``; zero-padded where the volume is
   smaller, the central part where it is larger: ``windows.centered_window_origin``, or centred on the
   head's intensity centroid with ``coarse.centre: mass``) -> coarse model -> per-axis softmax ->
   ``coordinate_classes.decode_axis_tf`` with ``factor = config.coarse.input_stride`` -> coarse voxel.
3. fine: one ``W^3`` window per landmark, centred on its coarse voxel (``windows.window_origin_around_tf``,
   zero-padded outside the volume), all K windows as one batch (in chunks of ``fine_batch_size``) ->
   fine model with ``landmark_index = arange(K)`` -> softmax -> decode (``factor = 1``) -> voxel.

   Option ``share_windows_margin_voxel = m``: landmarks whose coarse voxels fit into one window at least ``m``
   voxels from its faces share that window (``windows.shared_window_groups_tf``, greedy in landmark order):
   the fine trunk runs once per window, the per-landmark heads once per landmark. The fine network is trained
   with its landmark anywhere in the window (``data.pipeline``: uniform, 2 voxels from the border), so an
   off-centre landmark is within its training distribution as long as ``m`` exceeds the coarse error plus 2.
   For the 32 AFIDs of the MNI template and 64^3 windows, ``m = 16`` needs 10 windows instead of 32.

Option ``flip_average``: the fine stage runs a second time on the left-right mirrored volume (``x`` reversed,
the RAS grid's left-right axis), with each left landmark's window placed where its right partner's mirror
image lies (:func:`mirror_permutation`); the mirrored estimates are mapped back and averaged with the direct
ones. A mirrored head is a plausible head, so the second estimate has the same accuracy but partly independent
errors: on the shipped AFIDs model this cut the mean error on unseen synthetic heads from 5.00 to 4.33 mm
(``docs/MODEL_CARD.md``), for twice the fine stage's work. ``flip_disagreement_voxel`` (how far the two
estimates lie apart) is a per-landmark QC signal.

Option ``pass_views`` says what each pass looks at: ``"scan"`` (the volume), ``"mirror"`` (its mirror image
alone, the estimates mapped back) or ``"both"`` (flip-averaged); by default every pass is ``"both"`` with
``flip_average``, else ``"scan"``. Alternating views gives the ensemble its mirror-image members without running
both views in every pass. With ``refine_share_margin_voxel = m`` the windows of every pass after the first are
shared as above: safe where the first pass is not, since a later pass is centred on fine estimates (a few voxels
off), the first on coarse ones (often 10 voxels or more). The shipped AFIDs model uses both (``docs/MODEL_CARD.md``:
three passes, ``scan, mirror, scan``, shared windows after the first: as many fine windows as one pass on the scan
and one flip-averaged pass).

Option ``shape_prior`` (the reference positions of the K landmarks, ``[K, 3]`` mm, e.g. the template's AFIDs;
needs ``fine_passes > 1``): before each later pass the estimates are checked against the reference mapped by the
robust affine fit to them (:mod:`mdgru_keras.geometry.shape_prior`). A landmark farther than
``shape_prior_tolerance_mm`` from that prior most likely lay outside its window (a coarse estimate 20 mm off):
its next window is centred on the prior instead, and with ``average_passes`` its earlier estimates leave the
mean. ``shape_prior_distance_voxel`` is each final estimate's distance from the prior fitted to the final
estimates (zeros without the option): a QC signal.

Option ``aligned_windows`` (needs ``shape_prior``): the windows of every pass after the first are cut along the
axes of that fit instead of the volume's: ``"rotation"`` its nearest rotation (the fine network sees each head
in the reference's pose, whatever the pose in the scanner), ``"affine"`` its whole linear part (also the
reference's size). Windows are placed and shared in the fitted frame (``frame = linear^-1 (voxel - anchor)``),
sampled trilinearly (``training_crops.sample_window_affine_tf``, zero outside the volume) and their decoded
positions mapped back (``voxel = linear @ frame + anchor``); in the mirror image the same axes are mirrored.
The fine network was trained on heads turned by up to 15 degrees; turned with the head, its windows stay near
the middle of that range for heads tilted more (bench-pretrained's heads tilted by 20-30 degrees: 3.46 -> 2.58
mm, ``docs/MODEL_CARD.md``).

Option ``pooled_decoding``: ``voxel`` is the parabola through the per-voxel sums of the n classes of each voxel
(``voxel_n1_parabola``) instead of through the n classes (``voxel_parabola``; ``config.parabola`` false: the
argmax of either).

Option ``protocol_planes``: in the final fine estimates (``voxel`` and every ``voxel_*`` decoding, each through
its own AC and PC) the lateral ventricles' AFIDs (RLVAC, LLVAC at AC; RLVPC, LLVPC at PC) are moved along the
estimated AC-PC line onto the coronal plane of the estimated AC or PC, where the AFIDs protocol places them
(:mod:`mdgru_keras.geometry.protocol_planes`); ``coarse_voxel`` stays as the coarse network gave it. Needs AC
and PC among the landmarks.

Decoding: ``voxel`` / ``coarse_voxel`` use the parabola refinement when ``config.parabola`` is true and the
plain argmax otherwise; both variants are always returned too (``*_argmax``, ``*_parabola``), which are the
rows of the paper's Table 1a. The fine windows are centred on ``coarse_voxel`` (with ``fine_passes > 1``, later
passes on the previous pass's ``voxel``, or with ``average_passes`` on the mean of all earlier passes).

Confidence: per axis the probability mass of the peak class and its two neighbours
(``coordinate_classes.peak_mass_tf``), multiplied over the three axes: the network's probability that the landmark lies
within one class of the decoded position on every axis (assuming independent axes). In ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config
from mdgru_keras.data.pipeline import coarse_centre_origin
from mdgru_keras.geometry.coordinate_classes import decode_axis_tf, peak_mass_tf, pool_classes_tf
from mdgru_keras.geometry.protocol_planes import PLANE_ANCHORS, plane_constraints, project_onto_planes_tf
from mdgru_keras.geometry.shape_prior import (
    MIN_SHAPE_PRIOR_LANDMARKS,
    TOLERANCE_MM,
    fit_affine_tf,
    fit_shape_prior_tf,
    nearest_rotation_tf,
    shape_prior_of_fit_tf,
)
from mdgru_keras.geometry.training_crops import sample_window_affine_tf
from mdgru_keras.geometry.windows import (
    crop_with_padding_tf,
    largest_share_margin,
    shared_window_groups_tf,
    window_origin_around_tf,
    window_to_volume_voxel_tf,
)
from mdgru_keras.networks import AXES, marginal_features_mixed_by_level, split_fine_model
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
    ``voxel_n1_argmax``        [K, 3] float32  fine stage, classes pooled to one per voxel, argmax
    ``voxel_n1_parabola``      [K, 3] float32  fine stage, classes pooled to one per voxel, parabola
    ``flip_disagreement_voxel`` [K] float32    distance of the newest fine estimates from the scan and from its
                                               mirror image (0 unless a pass saw the mirror image)
    ``shape_prior_distance_voxel`` [K] float32 distance of ``voxel`` from the shape prior fitted to all of
                                               ``voxel`` (0 without ``shape_prior``)
    ``coarse_voxel``           [K, 3] float32  coarse position (centre of the fine windows)
    ``coarse_voxel_argmax``    [K, 3] float32  coarse stage, argmax decoding
    ``coarse_voxel_parabola``  [K, 3] float32  coarse stage, parabola decoding
    ``confidence``             [K] float32     fine-stage confidence (module docstring)
    ``coarse_confidence``      [K] float32     coarse-stage confidence
    ``probabilities_{x,y,z}``  [K, C] float32  fine per-axis class probabilities (of the direct pass)
    ``coarse_probabilities_*`` [K, Cc] float32 coarse per-axis class probabilities
    ``window_origin_voxel``    [K, 3] int32    origin of the fine window each landmark was decoded in (direct;
                                               an aligned window's voxel 0, rounded)
    ``fine_windows``           [] int32        number of fine windows run (K unless windows are shared;
                                               twice that with ``flip_average``)
    ``coarse_origin_voxel``    [3] int32       origin of the coarse ``P^3`` region in the volume
    ========================== =============== ===============================================================

    Args:
        coarse_model, fine_model: from :func:`mdgru_keras.networks.build_coarse_model` / ``build_fine_model``
            (or loaded), for the same ``config``.
        config: the preset both models were built with.
        fine_batch_size: at most this many fine windows go through the fine network at once (memory bound of
            the paper preset); ``None``: all at once (K windows, 2K with ``flip_average``).
        share_windows_margin_voxel: ``None`` (the paper): one window per landmark, centred on it; an integer
            ``m``: landmarks share windows with ``m`` voxels to spare (module docstring).
        fine_passes: 1 (the paper): the fine windows are centred on the coarse estimates; 2 or more: each
            further pass centres the windows on the previous fine estimates, so that a landmark the coarse
            stage missed by several voxels is finally decoded near the centre of its window.
        flip_average: average the fine estimates of the volume and of its left-right mirror image (module
            docstring); needs the landmarks' mirror pairs (:func:`mirror_permutation`).
        average_passes: with ``fine_passes > 1``, the result is the mean of all passes' estimates (positions and
            confidence; the probabilities and windows are the last pass's), and each pass is centred on the
            mean of the passes before it: an ensemble over window placements.
        protocol_planes: put the lateral ventricles' AFIDs on the coronal planes of AC and PC (module
            docstring); needs AC and PC among the landmarks.
        pass_views: per pass, ``"scan"``, ``"mirror"`` or ``"both"`` (module docstring); as many as
            ``fine_passes``, the last one seeing the scan (its probabilities and windows are reported). ``None``:
            ``"both"`` for every pass with ``flip_average``, ``"scan"`` without.
        refine_share_margin_voxel: ``None``: passes after the first place windows as the first does; ``m``:
            they share windows with ``m`` voxels to spare around the current estimates.
        pooled_decoding: answer (``voxel``) with the classes pooled to one per voxel (``voxel_n1_*``).
        shape_prior: ``None``, or the landmarks' reference positions ``[K, 3]`` (mm, any space): re-centre later
            passes of landmarks whose estimates stray from the shape prior (module docstring).
        shape_prior_tolerance_mm: how far (mm) an estimate may lie from the prior before it is re-centred.
        aligned_windows: ``None`` (the volume's axes), ``"rotation"`` or ``"affine"``: the axes of the windows
            of every pass after the first (module docstring); needs ``shape_prior``.
    """

    def __init__(
        self,
        coarse_model: keras.Model,
        fine_model: keras.Model,
        config: Config,
        fine_batch_size: int | None = None,
        share_windows_margin_voxel: int | None = None,
        fine_passes: int = 1,
        flip_average: bool = False,
        average_passes: bool = False,
        protocol_planes: bool = False,
        pass_views: Sequence[str] | None = None,
        refine_share_margin_voxel: int | None = None,
        pooled_decoding: bool = False,
        shape_prior: np.ndarray | Sequence[Sequence[float]] | None = None,
        shape_prior_tolerance_mm: float = TOLERANCE_MM,
        aligned_windows: str | None = None,
        name: str | None = "two_stage_localizer",
    ) -> None:
        super().__init__(name=name)
        self.coarse_model = coarse_model
        self.fine_model = fine_model
        self.config = config
        self.num_landmarks = config.num_landmarks
        self.fine_batch_size = fine_batch_size  # None: all windows at once
        self.share_windows_margin_voxel = share_windows_margin_voxel
        if fine_passes < 1:
            raise ValueError(f"fine_passes must be >= 1, got {fine_passes}")
        self.fine_passes = int(fine_passes)
        largest_margin = largest_share_margin(config.fine.window_size)
        for option, margin in (("share_windows_margin_voxel", share_windows_margin_voxel),
                               ("refine_share_margin_voxel", refine_share_margin_voxel)):
            if margin is not None and not 0 <= margin <= largest_margin:
                raise ValueError(f"{option} must be in [0, {largest_margin}] for {config.fine.window_size}^3 "
                                 f"windows, got {margin}")
        self.refine_share_margin_voxel = refine_share_margin_voxel
        if pass_views is None:
            pass_views = ("both" if flip_average else "scan",) * self.fine_passes
        pass_views = tuple(pass_views)
        if len(pass_views) != self.fine_passes or any(view not in PASS_VIEWS for view in pass_views):
            raise ValueError(f"pass_views must be {self.fine_passes} of {', '.join(PASS_VIEWS)} (one per fine pass), "
                             f"got {pass_views}")
        if pass_views[-1] == "mirror":
            raise ValueError("pass_views must end with a pass that sees the scan ('scan' or 'both'), got "
                             f"{pass_views}")
        self.pass_views = pass_views
        self.pooled_decoding = bool(pooled_decoding)
        self.flip_average = bool(flip_average)
        self.average_passes = bool(average_passes)
        if protocol_planes and not plane_constraints(config.landmarks):
            raise ValueError("protocol_planes needs AC, PC and at least one of "
                             f"{', '.join(PLANE_ANCHORS)} among the landmarks")
        self.protocol_planes = bool(protocol_planes)
        if shape_prior is not None:
            shape_prior = np.asarray(shape_prior, dtype=np.float64)
            if shape_prior.shape != (self.num_landmarks, 3) or not np.all(np.isfinite(shape_prior)):
                raise ValueError(f"shape_prior must be [{self.num_landmarks}, 3] finite positions, got shape "
                                 f"{shape_prior.shape}")
            if fine_passes < 2:
                raise ValueError("shape_prior needs fine_passes >= 2 (it re-centres the passes after the first)")
            if self.num_landmarks < MIN_SHAPE_PRIOR_LANDMARKS:
                raise ValueError(f"shape_prior needs at least {MIN_SHAPE_PRIOR_LANDMARKS} landmarks (an affine map has "
                                 f"12 parameters), got {self.num_landmarks}")
            if not shape_prior_tolerance_mm > 0:
                raise ValueError(f"shape_prior_tolerance_mm must be positive, got {shape_prior_tolerance_mm}")
        self.shape_prior = shape_prior
        if aligned_windows not in ALIGNED_WINDOWS:
            raise ValueError(f"aligned_windows must be one of {', '.join(map(str, ALIGNED_WINDOWS))}, got "
                             f"{aligned_windows!r}")
        if aligned_windows is not None and shape_prior is None:
            raise ValueError("aligned_windows needs a shape_prior (its fit gives the windows' axes)")
        self.aligned_windows = aligned_windows
        # the model grid is isotropic: its voxels are config.spacing_mm wide
        self.shape_prior_tolerance_voxel = float(shape_prior_tolerance_mm) / float(config.spacing_mm)
        # a constant (not a variable): the export saves no state beyond the models' variables
        self._mirror = tf.constant(mirror_permutation(config.landmarks), tf.int32)
        self.fine_trunk, self.fine_heads = split_fine_model(fine_model)
        # marginal heads: the trunk's level mix done per level (the same features, less arithmetic)
        self._trunk_features = marginal_features_mixed_by_level(self.fine_trunk) or (
            lambda windows: self.fine_trunk(windows, training=False))
        # a constant, so that a graph using it needs no variable beyond the models' (mdgru_keras.export tracks those)
        self.landmark_names = tf.constant(list(config.landmarks), dtype=tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="volume")])
    def __call__(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.localize(volume)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="volume")])
    def coarse(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        """The coarse stage only (its ``coarse_*`` outputs)."""
        features = self._preprocess(volume)
        return self._coarse_stage(features)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32, name="volume"),
            tf.TensorSpec([None, 3], tf.float32, name="center_voxel"),
        ]
    )
    def fine(self, volume: tf.Tensor, center_voxel: tf.Tensor) -> dict[str, tf.Tensor]:
        """The fine stage only, its windows placed around given positions ``[K, 3]`` (e.g. the ground truth:
        the fine network's own accuracy) instead of the coarse estimates."""
        center_voxel = tf.ensure_shape(center_voxel, [self.num_landmarks, 3])
        features = self._preprocess(volume)
        margin = self.share_windows_margin_voxel
        return self._fine_pass(features, center_voxel, margin, None, "both" if self.flip_average else "scan")[0]

    # -----------------------------------------------------------------------------------------------------

    def localize(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        """The whole two-stage localization (plain TF; ``__call__`` is its compiled form)."""
        features = self._preprocess(volume)
        result = self._coarse_stage(features)
        centre = result["coarse_voxel"]
        passes, weights = [], []
        latest = {}  # the newest estimates ``voxel`` of each view, "scan" and "mirror"
        frame = None  # the axes of the next pass's windows (None: the volume's own)
        for index, view in enumerate(self.pass_views):
            margin = self.share_windows_margin_voxel
            if index > 0 and self.refine_share_margin_voxel is not None:
                margin = self.refine_share_margin_voxel
            fine, seen = self._fine_pass(features, centre, margin, frame, view)
            latest.update(seen)
            passes.append(fine)
            weights.append(tf.ones([self.num_landmarks], tf.float32))
            if self.average_passes:
                fine = _mean_of_passes(passes, weights)
            centre = fine["voxel"]
            if self.shape_prior is not None and index + 1 < self.fine_passes:
                fit = fit_affine_tf(self.shape_prior, centre)
                prior = shape_prior_of_fit_tf(self.shape_prior, fit)
                if self.aligned_windows is not None:
                    frame = self._window_frame(fit)
                strayed = tf.norm(centre - prior, axis=-1) > self.shape_prior_tolerance_voxel  # [K]
                centre = tf.where(strayed[:, None], prior, centre)
                weights = [weight * (1.0 - tf.cast(strayed, tf.float32)) for weight in weights]
        result.update(fine)
        # how far the newest estimates from the mirror image and from the scan lie apart (zeros without both)
        result["flip_disagreement_voxel"] = (
            tf.norm(latest["scan"] - latest["mirror"], axis=-1) if len(latest) == 2
            else tf.zeros([self.num_landmarks], tf.float32)
        )
        if self.protocol_planes:  # every fine decoding: evaluate's rows and the answer stay one and the same
            for key in _POSITIONS:
                result[key] = project_onto_planes_tf(result[key], list(self.config.landmarks))
        result["shape_prior_distance_voxel"] = (
            tf.norm(result["voxel"] - fit_shape_prior_tf(self.shape_prior, result["voxel"]), axis=-1)
            if self.shape_prior is not None else tf.zeros([self.num_landmarks], tf.float32)
        )
        return result

    def _preprocess(self, volume: tf.Tensor) -> tf.Tensor:
        config = self.config
        features = preprocess(volume, config.spacing_mm, config.highpass_sigma_mm)
        return tf.ensure_shape(features, [None, None, None, 2])

    def _coarse_stage(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        config = self.config
        size, stride = config.coarse.padded_size, config.coarse.input_stride
        origin = coarse_centre_origin(features, config)
        region = crop_with_padding_tf(features, origin, (size, size, size))
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

    def _window_frame(self, fit: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(linear [3, 3], anchor_voxel [3])`` float32 of aligned windows, from a shape-prior fit ``[4, 3]``
        (:func:`mdgru_keras.geometry.shape_prior.fit_affine_tf`): a window's voxel ``c`` shows the volume at
        ``linear @ (c + origin) + anchor_voxel``, with window origins placed in that frame. ``linear`` is the
        fit's rotation (``aligned_windows="rotation"``) or its whole linear part per model-grid voxel of the
        reference (``"affine"``: the head also brought to the reference's size and shape)."""
        linear = tf.transpose(fit[:3])  # reference mm -> model-grid voxels
        if self.aligned_windows == "rotation":
            linear = nearest_rotation_tf(linear)
        else:
            linear = linear * float(self.config.spacing_mm)
        return tf.cast(linear, tf.float32), tf.cast(fit[3], tf.float32)

    def _fine_views(
        self, views: list[tf.Tensor], centres: list[tf.Tensor], margin: int | None,
        frames: list[tuple[tf.Tensor, tf.Tensor] | None] | None = None,
    ) -> list[dict[str, tf.Tensor]]:
        """The fine stage on each preprocessed volume of ``views`` around its ``centres`` ``[K, 3]``, with one
        trunk call for the windows of all views (one copy of the trunk in the graph, larger batches); windows
        shared with ``margin`` voxels to spare (``None``: one centred window per landmark), along the volume's
        axes or, where the view's entry of ``frames`` is ``(linear, anchor_voxel)``, along those axes
        (:meth:`_window_frame`: placed and grouped in that frame, sampled trilinearly)."""
        config = self.config
        size = config.fine.window_size
        crops = []
        for features, centre, frame in zip(views, centres, frames or [None] * len(views)):
            # the centres in the windows' frame: volume voxels, or the aligned frame's coordinates
            placed = centre if frame is None else _frame_of_voxel(centre, frame)
            if margin is None:  # the paper: one window centred on each landmark
                window_of_landmark = tf.range(self.num_landmarks, dtype=tf.int32)
                window_origins = window_origin_around_tf(placed, size)  # [K, 3]
            else:
                window_of_landmark, window_origins = shared_window_groups_tf(placed, size, margin)  # [K], [G, 3]
            if frame is None:
                windows = tf.map_fn(
                    lambda origin, features=features: crop_with_padding_tf(features, origin, (size,) * 3),
                    window_origins,
                    fn_output_signature=tf.TensorSpec([size, size, size, 2], tf.float32),
                )  # [G, W, W, W, 2]
            else:
                windows = tf.map_fn(
                    lambda origin, features=features, frame=frame: sample_window_affine_tf(
                        features, frame[0], _voxel_of_frame(tf.cast(origin, tf.float32), frame), (size,) * 3),
                    window_origins,
                    fn_output_signature=tf.TensorSpec([size, size, size, 2], tf.float32),
                )
            crops.append((windows, window_of_landmark, window_origins, frame))
        all_features = self._fine_features(tf.concat([crop[0] for crop in crops], axis=0))
        results, start = [], tf.constant(0)
        for windows, window_of_landmark, window_origins, frame in crops:
            count = tf.shape(windows)[0]
            window_features = all_features[start : start + count]  # [G, F] or [G, g, g, g, F]
            start += count
            logits = self.fine_heads(
                tf.gather(window_features, window_of_landmark), tf.range(self.num_landmarks, dtype=tf.int32)
            )
            origins = tf.gather(window_origins, window_of_landmark)  # [K, 3]
            results.append(self._decode_fine(logits, origins, count, frame))
        return results

    def _decode_fine(
        self, logits: dict[str, tf.Tensor], origins: tf.Tensor, windows: tf.Tensor,
        frame: tuple[tf.Tensor, tf.Tensor] | None = None,
    ) -> dict[str, tf.Tensor]:
        """The fine outputs (class docstring) of per-landmark logits ``[K, C]`` decoded in windows at ``origins``
        (in the windows' ``frame``, see :meth:`_fine_views`)."""
        config = self.config
        probabilities = {axis: tf.nn.softmax(logits[axis], axis=-1) for axis in AXES}  # [K, C]
        decoded = _decode(probabilities, config.superresolution, 1, origins)
        pooled = {axis: pool_classes_tf(probabilities[axis], config.superresolution) for axis in AXES}
        decoded_n1 = _decode(pooled, 1, 1, origins)
        if frame is not None:  # frame coordinates -> volume voxels
            for positions in (decoded, decoded_n1):
                for name in ("argmax", "parabola"):
                    positions[name] = _voxel_of_frame(positions[name], frame)
            origins = tf.cast(tf.round(_voxel_of_frame(tf.cast(origins, tf.float32), frame)), tf.int32)
        answer = decoded_n1 if self.pooled_decoding else decoded
        result = {
            "voxel": answer["parabola"] if config.parabola else answer["argmax"],
            "voxel_argmax": decoded["argmax"],
            "voxel_parabola": decoded["parabola"],
            "voxel_n1_argmax": decoded_n1["argmax"],
            "voxel_n1_parabola": decoded_n1["parabola"],
            "confidence": decoded["confidence"],
            "flip_disagreement_voxel": tf.zeros([self.num_landmarks], tf.float32),
            "window_origin_voxel": origins,
            "fine_windows": windows,
        }
        result.update({f"probabilities_{axis}": probabilities[axis] for axis in AXES})
        return result

    def _mirrored(self, voxel: tf.Tensor, size_x: tf.Tensor) -> tf.Tensor:
        """Positions ``[K, 3]`` in the left-right mirrored volume (``x -> X - 1 - x``), in the mirrored landmark
        order (row ``k`` holds the mirror image of landmark ``k``'s partner). Its own inverse."""
        return _reflect_x(tf.gather(voxel, self._mirror), size_x)

    def _fine_pass(
        self, features: tf.Tensor, centre_voxel: tf.Tensor, margin: int | None,
        frame: tuple[tf.Tensor, tf.Tensor] | None, view: str,
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        """One fine pass that sees ``view`` (``"scan"``, ``"mirror"`` or ``"both"``, module docstring), windows
        placed around ``centre_voxel`` in ``frame``: its outputs (for ``"both"`` the mean of the two views; for
        ``"mirror"`` the positions and confidence mapped back, the rest as the mirror image saw it) and each view's
        estimates ``voxel`` ``{view: [K, 3]}`` in the volume's voxels and landmark order."""
        size_x = tf.shape(features)[0]
        views = ("scan", "mirror") if view == "both" else (view,)
        inputs = {"scan": (features, centre_voxel, frame)}
        if "mirror" in views:
            mirrored_frame = None
            if frame is not None:  # the same axes seen in the mirror: x negated on both sides of the map
                linear, anchor = frame
                flip = tf.constant([-1.0, 1.0, 1.0])
                mirrored_frame = (flip[:, None] * linear * flip[None, :], _reflect_x(anchor, size_x))
            inputs["mirror"] = (tf.reverse(features, [0]), self._mirrored(centre_voxel, size_x), mirrored_frame)
        outputs = dict(zip(views, self._fine_views(
            [inputs[one][0] for one in views], [inputs[one][1] for one in views], margin,
            [inputs[one][2] for one in views],
        )))
        if "mirror" in outputs:  # back to the volume's voxels and landmark order
            mirrored = dict(outputs["mirror"])
            for key in _POSITIONS:
                mirrored[key] = self._mirrored(mirrored[key], size_x)
            mirrored["confidence"] = tf.gather(mirrored["confidence"], self._mirror)
            outputs["mirror"] = mirrored
        seen = {one: outputs[one]["voxel"] for one in views}
        if view != "both":
            return outputs[view], seen
        direct, mirrored = outputs["scan"], outputs["mirror"]
        result = dict(direct)
        for key in (*_POSITIONS, "confidence"):
            result[key] = 0.5 * (direct[key] + mirrored[key])
        result["flip_disagreement_voxel"] = tf.norm(direct["voxel"] - mirrored["voxel"], axis=-1)
        result["fine_windows"] = direct["fine_windows"] + mirrored["fine_windows"]
        return result, seen

    def _fine_features(self, windows: tf.Tensor) -> tf.Tensor:
        """Trunk features ``[N, F]`` (``[N, G, G, G, F]`` for marginal heads) of fine windows ``[N, W, W, W, 2]``,
        ``fine_batch_size`` at a time."""
        chunk = self.fine_batch_size
        if chunk is None:
            return self._trunk_features(windows)
        size = self.config.fine.window_size
        count = tf.shape(windows)[0]
        chunks = (count + chunk - 1) // chunk
        padded = tf.concat([windows, tf.zeros(tf.stack([chunks * chunk - count, size, size, size, 2]))], axis=0)
        stacked = tf.reshape(padded, tf.stack([chunks, chunk, size, size, size, 2]))
        feature_shape = list(self.fine_trunk.output.shape[1:])  # [F] (dense heads) or [G, G, G, F] (marginal)
        features = tf.map_fn(
            self._trunk_features,
            stacked,
            fn_output_signature=tf.TensorSpec([chunk, *feature_shape], tf.float32),
            parallel_iterations=1,
        )
        return tf.reshape(features, [-1, *feature_shape])[:count]


# what a fine pass looks at (pass_views): the volume, its left-right mirror image, or both, averaged
PASS_VIEWS = ("scan", "mirror", "both")

# values of the aligned_windows option: the volume's axes, the shape-prior fit's rotation, or its linear part
ALIGNED_WINDOWS = (None, "rotation", "affine")

# the fine-stage outputs that are positions (averaged over flips and passes) and the confidence
_POSITIONS = ("voxel", "voxel_argmax", "voxel_parabola", "voxel_n1_argmax", "voxel_n1_parabola")


def _mean_of_passes(passes: list[dict[str, tf.Tensor]], weights: list[tf.Tensor]) -> dict[str, tf.Tensor]:
    """The last pass's outputs, with positions and confidence replaced by their mean over ``passes`` (per landmark,
    weighted by ``weights`` ``[K]`` per pass; the last pass's are ones)."""
    result = dict(passes[-1])
    total = tf.add_n(weights)  # [K], at least the last pass's 1
    shares = [weight / total for weight in weights]
    for key in (*_POSITIONS, "confidence"):  # [K, 3] or [K]: each landmark's share along its first axis
        result[key] = tf.add_n([one[key] * tf.reshape(share, [-1] + [1] * (one[key].shape.rank - 1))
                                for one, share in zip(passes, shares)])
    return result


def _voxel_of_frame(points: tf.Tensor, frame: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    """Aligned-window frame coordinates ``[..., 3]`` -> volume voxels: ``linear @ point + anchor_voxel``
    (``frame = (linear, anchor_voxel)``, :meth:`TwoStageLocalizer._window_frame`)."""
    linear, anchor = frame
    return tf.linalg.matvec(linear, points) + anchor


def _frame_of_voxel(voxel: tf.Tensor, frame: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    """The inverse of :func:`_voxel_of_frame` for points ``[K, 3]``."""
    linear, anchor = frame
    return tf.transpose(tf.linalg.solve(linear, tf.transpose(voxel - anchor[None, :])))


def _reflect_x(points: tf.Tensor, size_x: tf.Tensor) -> tf.Tensor:
    """Positions ``[..., 3]`` in the volume reversed along x (``x -> X - 1 - x``), the same points otherwise."""
    return tf.concat([tf.cast(size_x, points.dtype) - 1.0 - points[..., :1], points[..., 1:]], axis=-1)


def mirror_permutation(landmarks: Sequence[str]) -> np.ndarray:
    """``index[k]``: the landmark that landmark ``k`` becomes in a left-right mirror image.

    Pairs follow the AFIDs naming: two names that differ only in a leading ``R`` / ``L`` (``RMB`` / ``LMB``,
    ``RLVAC`` / ``LLVAC``) are each other's mirror image; every other landmark (midline ones such as ``AC``,
    ``PMJ``; a name whose partner is not in the list) is its own.
    """
    names = list(landmarks)
    position = {name: index for index, name in enumerate(names)}
    swap = {"R": "L", "L": "R"}
    index = []
    for name in names:
        partner = swap[name[0]] + name[1:] if name[:1] in swap else None
        index.append(position.get(partner, position[name]))
    return np.asarray(index, dtype=np.int32)


def _decode(
    probabilities: dict[str, tf.Tensor], superresolution: int, factor: int, origin_voxel: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Argmax and parabola volume voxels ``[K, 3]`` and the confidence ``[K]`` of per-axis softmaxes ``[K, C]``."""
    decoded = {}
    for name, parabola in (("argmax", False), ("parabola", True)):
        window_voxel = tf.stack(
            [decode_axis_tf(probabilities[axis], superresolution, factor, parabola) for axis in AXES],
            axis=-1,
        )
        decoded[name] = window_to_volume_voxel_tf(window_voxel, origin_voxel)
    mass = tf.stack([peak_mass_tf(probabilities[axis]) for axis in AXES], axis=-1)
    decoded["confidence"] = tf.reduce_prod(mass, axis=-1)
    return decoded
