"""The 3D U-Net heatmap baseline: target, decoding, a real (short) training run, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from mdgru_keras.baselines.heatmaps import gaussian_heatmap, gaussian_heatmap_tf, heatmap_peak
from mdgru_keras.baselines.unet import (
    LandmarkChannel,
    UNetConfig,
    UNetLocalizer,
    build_unet,
    compile_unet,
    fit_unet,
    heatmap_example,
    load_unet,
    train_unet,
)
from mdgru_keras.config import load_preset, with_landmarks
from mdgru_keras.data.records import Subject, write_dataset
from mdgru_keras.geometry.windows import crop_with_padding, window_origin_around

W = 16  # the tiny preset's fine window

fractional_point = st.tuples(*[st.floats(2.0, W - 3.0, allow_nan=False)] * 3)


@settings(max_examples=30, deadline=None)
@given(fractional_point, st.sampled_from([1.0, 2.0, 3.0]))
def test_heatmap_target_peaks_at_window_voxel(window_voxel, sigma):
    window_voxel = np.array(window_voxel)
    target = gaussian_heatmap_tf(tf.constant(window_voxel, tf.float32), W, sigma).numpy()
    assert target.shape == (W, W, W)
    np.testing.assert_allclose(target, gaussian_heatmap(window_voxel, W, sigma), atol=1e-6)
    # the brightest voxel is the one containing the point, and the value there is the Gaussian's
    argmax = np.unravel_index(np.argmax(target), target.shape)
    np.testing.assert_array_equal(argmax, np.floor(window_voxel + 0.5))
    assert target[argmax] == pytest.approx(np.exp(-np.sum((argmax - window_voxel) ** 2) / (2 * sigma**2)), rel=1e-5)
    # sub-voxel: the centroid, independent of any decoder, sits at window_voxel where the Gaussian is not cut off
    if np.all((window_voxel >= 4 * sigma) & (window_voxel <= W - 1 - 4 * sigma)):
        grid = np.stack(np.meshgrid(*[np.arange(W)] * 3, indexing="ij"), axis=-1)
        centroid = (grid * target[..., None]).sum(axis=(0, 1, 2)) / target.sum()
        np.testing.assert_allclose(centroid, window_voxel, atol=1e-3)


def test_heatmap_example_maps_a_batched_fine_element():
    unet = UNetConfig(sigma_voxel=2.0, heatmap_amplitude=3.0)
    window_voxel = np.array([[7.3, 8.6, 6.5], [5.0, 10.2, 9.9]], np.float32)
    # all landmarks' positions [B, K, 3]; each window's own landmark (index 0, then 1) is on the diagonal
    all_window_voxel = np.full((2, 2, 3), 99.0, np.float32)  # the other landmark: far outside, must be ignored
    all_window_voxel[0, 0], all_window_voxel[1, 1] = window_voxel
    inputs = {"window": tf.zeros([2, W, W, W, 2])}
    labels = {axis: tf.zeros([2, 2], tf.int32) for axis in "xyz"}
    metadata = {"window_voxel": tf.constant(all_window_voxel), "subject": tf.constant(["a", "b"]),
                "landmark_index": tf.constant([0, 1])}
    dataset = tf.data.Dataset.from_tensors((inputs, labels, metadata)).map(
        lambda i, lab, m: heatmap_example(i, lab, m, window_size=W, unet=unet)
    )
    mapped_inputs, heatmap = next(iter(dataset))
    assert set(mapped_inputs) == {"window", "landmark_index"}
    assert heatmap.shape == (2, W, W, W)
    assert float(tf.reduce_max(heatmap)) <= 3.0
    np.testing.assert_allclose(heatmap_peak(heatmap.numpy()), window_voxel, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(fractional_point, st.floats(1.0, 3.0), st.floats(0.5, 50.0))
def test_peak_decoding_recovers_fractional_centre(centre, sigma, amplitude):
    centre = np.array(centre)
    # made here from the formula, not with gaussian_heatmap
    axes = [np.exp(-((np.arange(W) - c) ** 2) / (2 * sigma**2)) for c in centre]
    heatmap = amplitude * np.einsum("i,j,k->ijk", *axes)
    assert np.abs(heatmap_peak(heatmap) - centre).max() < 0.1


def test_peak_decoding_on_noisy_and_degenerate_maps(rng):
    centres = rng.uniform(3, W - 4, size=(20, 3))
    heatmaps = gaussian_heatmap(centres, W, 2.0) + rng.normal(0, 0.01, size=(20, W, W, W))
    errors = np.linalg.norm(heatmap_peak(heatmaps) - centres, axis=-1)
    assert errors.mean() < 0.1, errors
    # negative surroundings, a border peak and an all-negative map decode without NaN
    spike = -np.ones((W, W, W))
    spike[4, 5, 6] = 1.0
    np.testing.assert_array_equal(heatmap_peak(spike), [4, 5, 6])
    border = gaussian_heatmap(np.array([0.2, 7.0, 15.3]), W, 2.0)
    np.testing.assert_allclose(heatmap_peak(border), [0.0, 7.0, 15.0], atol=1e-6)
    assert np.isfinite(heatmap_peak(-np.ones((W, W, W)))).all()


def test_landmark_channel_keeps_the_channel_of_each_sample(rng):
    heatmaps = rng.normal(size=(3, 4, 4, 4, 5)).astype(np.float32)
    index = np.array([4, 0, 2], np.int32)
    selected = LandmarkChannel()([tf.constant(heatmaps), tf.constant(index)]).numpy()
    np.testing.assert_allclose(selected, heatmaps[np.arange(3), ..., index], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# learning: a bright blob (landmark A) and a dark blob (landmark B) in noise; windows around shifted estimates

VOLUME = 32
MAX_SHIFT = 3  # coarse error of the synthetic "coarse estimates", per axis, in voxels
BUDGET_SECONDS = 90.0  # wall-time bound of the learning run (it mostly ends at MAX_STEPS; the machine is shared)
MAX_STEPS = 150


def _synthetic_subject(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed volume ``[V,V,V,2]`` (volume, high-pass) and its landmarks ``[2, 3]`` (voxels)."""
    landmarks_voxel = rng.uniform(8, VOLUME - 9, size=(2, 3))
    while np.linalg.norm(landmarks_voxel[0] - landmarks_voxel[1]) < 6:
        landmarks_voxel[1] = rng.uniform(8, VOLUME - 9, size=3)
    grid = np.stack(np.meshgrid(*[np.arange(VOLUME)] * 3, indexing="ij"), axis=-1)
    volume = gaussian_filter(rng.normal(size=(VOLUME,) * 3), 1.0) * 2.0
    for sign, point in zip((3.0, -3.0), landmarks_voxel):
        volume += sign * np.exp(-np.sum((grid - point) ** 2, axis=-1) / (2 * 1.5**2))
    volume = (volume - volume.mean()) / volume.std()
    highpass = volume - gaussian_filter(volume, 2.0)
    return np.stack([volume, highpass / highpass.std()], axis=-1).astype(np.float32), landmarks_voxel


def _coarse_estimates(landmarks_voxel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return landmarks_voxel + rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=landmarks_voxel.shape)


def _training_windows(rng: np.random.Generator, subjects: int, per_subject: int) -> tuple[dict, dict]:
    """Fine windows the way the pipeline makes them: ``({"window"}, metadata)`` with the metadata of
    :func:`mdgru_keras.data.pipeline.make_dataset` (``window_voxel`` of both landmarks ``[N, 2, 3]`` and the
    ``landmark_index`` each window was placed for)."""
    windows, window_voxels, indices = [], [], []
    for _ in range(subjects):
        volume, landmarks_voxel = _synthetic_subject(rng)
        for _ in range(per_subject):
            k = rng.integers(2)
            origin = window_origin_around(_coarse_estimates(landmarks_voxel[k], rng), (W, W, W))
            windows.append(crop_with_padding(volume, origin, (W, W, W)))
            window_voxels.append(landmarks_voxel - origin)
            indices.append(k)
    metadata = {"window_voxel": np.array(window_voxels, np.float32), "landmark_index": np.array(indices, np.int32)}
    return {"window": np.stack(windows)}, metadata


@pytest.fixture(scope="module")
def trained():
    """A U-Net trained for a bounded time (the learning test and the save/load test share it)."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    config = with_landmarks(load_preset("tiny"), ["A", "B"])
    unet = UNetConfig(base_filters=8, levels=3, sigma_voxel=2.0)
    inputs, metadata = _training_windows(rng, subjects=48, per_subject=16)
    labels = {"x": metadata["landmark_index"]}  # the MD-GRU's labels: not used by the U-Net
    dataset = (
        tf.data.Dataset.from_tensor_slices((inputs, labels, metadata))
        .shuffle(len(inputs["window"]), seed=0)
        .repeat()
        .batch(8, drop_remainder=True)
        .map(lambda i, lab, m: heatmap_example(i, lab, m, window_size=W, unet=unet))
        .prefetch(2)
    )
    model = compile_unet(build_unet(config, unet), unet)
    summary = train_unet(model, dataset, budget_seconds=BUDGET_SECONDS, unet=unet, max_steps=MAX_STEPS, progress=False)
    print(f"U-Net trained: {summary}")
    return model, config, summary


@pytest.mark.slow
def test_trained_unet_localizes_held_out_subjects(trained):
    model, config, summary = trained
    assert 10 < summary.steps <= MAX_STEPS
    assert summary.seconds < BUDGET_SECONDS + 20 * summary.median_step_seconds + 5.0
    localizer = UNetLocalizer(model, config)
    rng = np.random.default_rng(99)
    errors, coarse_errors = [], []
    for _ in range(12):
        volume, landmarks_voxel = _synthetic_subject(rng)
        coarse_voxel = _coarse_estimates(landmarks_voxel, rng)
        voxel = localizer.localize(volume, coarse_voxel)
        assert voxel.shape == (2, 3)
        errors.append(np.linalg.norm(voxel - landmarks_voxel, axis=-1))
        coarse_errors.append(np.linalg.norm(coarse_voxel - landmarks_voxel, axis=-1))
    errors, coarse_errors = np.array(errors), np.array(coarse_errors)
    print(f"held-out error {errors.mean():.2f} (per landmark {errors.mean(0)}), coarse {coarse_errors.mean():.2f}")
    assert errors.mean() < 1.5
    assert errors.mean(axis=0).max() < 2.0  # both landmarks (both output channels) learned, not just one


@pytest.mark.slow
def test_save_load_round_trip_gives_the_same_output(trained, tmp_path):
    model, config, _ = trained
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = load_unet(path)
    rng = np.random.default_rng(5)
    inputs = {"window": rng.normal(size=(3, W, W, W, 2)).astype(np.float32), "landmark_index": np.array([0, 1, 1])}
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0), atol=1e-5)
    volume, landmarks_voxel = _synthetic_subject(rng)
    np.testing.assert_allclose(
        UNetLocalizer.load(path, config).localize(volume, landmarks_voxel),
        UNetLocalizer(model, config).localize(volume, landmarks_voxel),
        atol=1e-4,
    )


def test_unet_saved_with_keras_conv3d_transpose_loads_with_the_same_output(tmp_path):
    import keras

    from mdgru_keras.layers import StridedConv3DTranspose

    config = with_landmarks(load_preset("tiny"), ["A", "B"])
    model = build_unet(config, UNetConfig(levels=3))
    assert sum(isinstance(layer, StridedConv3DTranspose) for layer in model.layers) == 2

    def keras_layers(layer):
        if isinstance(layer, StridedConv3DTranspose):
            return keras.layers.Conv3DTranspose(layer.filters, 2, strides=2, name=layer.name)
        return layer

    old = keras.models.clone_model(model, clone_function=keras_layers)  # a U-Net saved before the new layer
    old.set_weights(model.get_weights())
    old.save(tmp_path / "old.keras")
    loaded = load_unet(tmp_path / "old.keras")
    assert {type(loaded.get_layer(f"up{level}_transpose")) for level in (0, 1)} == {StridedConv3DTranspose}
    rng = np.random.default_rng(6)
    inputs = {"window": rng.normal(size=(2, W, W, W, 2)).astype(np.float32), "landmark_index": np.array([0, 1])}
    np.testing.assert_allclose(loaded(inputs).numpy(), old(inputs).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_localizer_refuses_mismatched_inputs(trained):
    model, config, _ = trained
    localizer = UNetLocalizer(model, config)
    with pytest.raises(ValueError, match=r"\[X, Y, Z, 2\]"):
        localizer.localize(np.zeros((20, 20, 20, 3), np.float32), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="3 coarse estimates for 2 landmarks"):
        localizer.localize(np.zeros((20, 20, 20, 2), np.float32), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="window_size"):
        UNetLocalizer(model, config.replace(fine=config.fine.__class__(window_size=8, network=config.fine.network)))


# ---------------------------------------------------------------------------------------------------------
# fit_unet on a prepared dataset, through the fine pipeline


@pytest.mark.slow
def test_fit_unet_trains_on_the_fine_pipeline_and_writes_model_and_summary(tmp_path):
    config = with_landmarks(load_preset("tiny"), ["A", "B"])
    rng = np.random.default_rng(3)
    subjects = {}
    for i in range(6):
        # a raw scan (arbitrary intensity units) at 1 mm; preprocessing is the pipeline's job
        volume, landmarks_voxel = _synthetic_subject(rng)
        subjects[f"s{i}"] = Subject(f"s{i}", 100.0 + 40.0 * volume[..., 0], np.eye(4), landmarks_voxel, ("A", "B"))
    (tmp_path / "data").mkdir()
    write_dataset(tmp_path / "data", {"train": ["s0", "s1", "s2", "s3"], "val": ["s4", "s5"]}, subjects.__getitem__,
                  ["A", "B"], spacing_mm=1.0)
    out = tmp_path / "models" / "unet.keras"
    summary = fit_unet(tmp_path / "data", config, budget_seconds=120.0, out_path=out, seed=1,
                       unet=UNetConfig(base_filters=4, norm_groups=2, upsampling="upsample"), max_steps=25,
                       progress=False)
    print(f"fit_unet: {summary}")
    assert summary.steps == 25 and summary.samples_per_step == config.training.batch_size
    assert summary.final_loss < summary.first_loss
    assert json.loads(out.with_suffix(".json").read_text())["steps"] == 25
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet.json", "unet.keras"]  # no temp files left
    # the saved model serves a raw scan (preprocessed by the localizer as in training)
    localizer = UNetLocalizer.load(out, config)
    subject = subjects["s4"]
    voxel = localizer.localize(subject.volume, subject.landmarks_voxel + 1.0)
    assert voxel.shape == (2, 3) and np.isfinite(voxel).all()
    window_voxel = voxel - np.stack([window_origin_around(c, (W, W, W)) for c in subject.landmarks_voxel + 1.0])
    assert np.all((window_voxel >= 0) & (window_voxel <= W - 1))
    with pytest.raises(ValueError, match=".keras"):
        fit_unet(tmp_path / "data", config, 1.0, tmp_path / "unet.h5")
