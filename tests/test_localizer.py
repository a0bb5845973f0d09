"""The two-stage localizer: bookkeeping of windows and decodings, export, and real learning on synthetic blobs."""

import dataclasses
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdgru_keras import networks as N
from mdgru_keras.config import load_preset, with_landmarks
from mdgru_keras.geometry.coordinate_classes import decode_axis, peak_mass, window_voxel_to_class
from mdgru_keras.geometry.windows import centered_window_origin, crop_with_padding, window_origin_around
from mdgru_keras.localizer import TwoStageLocalizer
from mdgru_keras.preprocessing import preprocess

pytestmark = pytest.mark.slow  # builds and traces two-stage localizers (9-70 s a test on 2 cores); exports; learns

# ---------------------------------------------------------------------------------------------------------
# bookkeeping (random weights)


@pytest.fixture(scope="module", params=["dense", "marginal"])
def tiny3(request):
    """The tiny preset with three landmarks; the fine stage with either kind of heads."""
    config = with_landmarks(load_preset("tiny"), ["A", "B", "C"])
    network = dataclasses.replace(config.fine.network, head=request.param)
    config = dataclasses.replace(config, fine=dataclasses.replace(config.fine, network=network))
    keras.utils.set_random_seed(3)
    coarse, fine = N.build_coarse_model(config), N.build_fine_model(config)
    # one instance per test module: its tf.function is traced once for every volume shape
    return config, coarse, fine, TwoStageLocalizer(coarse, fine, config)


@pytest.mark.parametrize("shape", [(30, 37, 25), (32, 32, 32), (9, 50, 33)])
def test_outputs_follow_from_the_probabilities_by_the_geometry_rules(tiny3, shape, rng):
    config, coarse, fine, localizer = tiny3
    volume = rng.normal(size=shape).astype(np.float32)
    out = {k: v.numpy() for k, v in localizer(volume).items()}
    k, n, s = 3, config.superresolution, config.coarse.input_stride
    c_coarse, c_fine = N.stage_classes(config, "coarse")[0], N.stage_classes(config, "fine")[0]
    for axis in "xyz":
        assert out[f"coarse_probabilities_{axis}"].shape == (k, c_coarse)
        assert out[f"probabilities_{axis}"].shape == (k, c_fine)
        np.testing.assert_allclose(out[f"probabilities_{axis}"].sum(-1), 1.0, rtol=1e-5)
    # coarse: decoded in the central P^3 region, then shifted by its origin
    origin = centered_window_origin(np.array(shape), config.coarse.padded_size)
    np.testing.assert_array_equal(out["coarse_origin_voxel"], origin)
    probs = np.stack([out[f"coarse_probabilities_{a}"] for a in "xyz"], axis=1).astype(np.float64)  # [K, 3, C]
    for parabola, key in ((False, "coarse_voxel_argmax"), (True, "coarse_voxel_parabola")):
        np.testing.assert_allclose(out[key], decode_axis(probs, n, s, parabola) + origin, atol=1e-4)
    np.testing.assert_array_equal(out["coarse_voxel"], out["coarse_voxel_parabola"])  # config.parabola
    # fine: one window per landmark centred on its coarse voxel
    origins = window_origin_around(out["coarse_voxel"], config.fine.window_size)
    np.testing.assert_array_equal(out["window_origin_voxel"], origins)
    probs = np.stack([out[f"probabilities_{a}"] for a in "xyz"], axis=1).astype(np.float64)
    for parabola, key in ((False, "voxel_argmax"), (True, "voxel_parabola")):
        np.testing.assert_allclose(out[key], decode_axis(probs, n, 1, parabola) + origins, atol=1e-4)
    np.testing.assert_array_equal(out["voxel"], out["voxel_parabola"])
    np.testing.assert_allclose(out["confidence"], peak_mass(probs).prod(-1), rtol=1e-4)
    # the fine windows really are those crops of the preprocessed volume
    features = preprocess(volume, config.spacing_mm, config.highpass_sigma_mm).numpy()
    windows = np.stack([crop_with_padding(features, o, (config.fine.window_size,) * 3) for o in origins])
    logits = fine({"window": windows})  # [3 windows, 3 landmarks, C]: window k was placed for landmark k
    own = tf.nn.softmax(logits["x"]).numpy()[np.arange(3), np.arange(3)]
    np.testing.assert_allclose(out["probabilities_x"], own, atol=1e-5)


def test_chunked_fine_batches_and_coarse_signature_agree_with_the_full_call(tiny3, rng):
    config, coarse, fine, localizer = tiny3
    volume = rng.normal(size=(28, 33, 31)).astype(np.float32)
    full = localizer(volume)
    chunked = TwoStageLocalizer(coarse, fine, config, fine_batch_size=2)(volume)  # 3 = 2 + 1 (+1 filler)
    for key in full:
        np.testing.assert_allclose(chunked[key].numpy(), full[key].numpy(), rtol=1e-5, atol=1e-5)
    coarse_only = localizer.coarse(volume)
    for key, value in coarse_only.items():
        np.testing.assert_allclose(value.numpy(), full[key].numpy(), rtol=1e-5, atol=1e-5)


def test_shared_windows_run_the_trunk_once_per_window(tiny3, rng):
    config, coarse, fine, localizer = tiny3
    size = config.fine.window_size
    shared = TwoStageLocalizer(coarse, fine, config, share_windows_margin_voxel=4)
    volume = rng.normal(size=(40, 36, 30)).astype(np.float32)
    features = preprocess(volume, config.spacing_mm, config.highpass_sigma_mm).numpy()
    near = np.array([[12.0, 15, 14], [14, 13, 15], [13, 16, 13]], np.float32)  # fit one window, 4 voxels spare
    out = shared.fine(volume, near)
    assert int(out["fine_windows"]) == 1
    origin = out["window_origin_voxel"].numpy()
    np.testing.assert_array_equal(origin, np.repeat(origin[:1], 3, axis=0))
    window = crop_with_padding(features, origin[0], (size,) * 3)
    logits = fine({"window": window[None]})  # one window, all three landmarks read from it
    np.testing.assert_allclose(out["probabilities_y"].numpy(), tf.nn.softmax(logits["y"]).numpy()[0], atol=1e-5)
    # far apart: one window each, exactly the unshared (paper) windows and results
    far = np.array([[5.0, 5, 5], [30, 8, 20], [10, 30, 25]], np.float32)
    out, unshared = shared.fine(volume, far), localizer.fine(volume, far)
    assert int(out["fine_windows"]) == 3 and int(unshared["fine_windows"]) == 3
    np.testing.assert_array_equal(out["window_origin_voxel"].numpy(), window_origin_around(far, size))
    np.testing.assert_allclose(out["voxel"].numpy(), unshared["voxel"].numpy(), atol=1e-5)
    # the fine stage from the coarse estimates is the second half of the full call
    full = localizer(volume)
    again = localizer.fine(volume, full["coarse_voxel"])
    np.testing.assert_allclose(again["voxel"].numpy(), full["voxel"].numpy(), atol=1e-5)


def test_localizer_exports_as_a_savedmodel(tiny3, tmp_path, rng):
    config, coarse, fine, localizer = tiny3
    volume = rng.normal(size=(20, 26, 31)).astype(np.float32)
    expected = localizer(volume)
    tf.saved_model.save(localizer, str(tmp_path / "localizer"))
    loaded = tf.saved_model.load(str(tmp_path / "localizer"))
    actual = loaded(tf.constant(volume))
    for key in ("voxel", "coarse_voxel", "confidence"):
        np.testing.assert_allclose(actual[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-5)
    assert int(loaded.fine(tf.constant(volume), expected["coarse_voxel"])["fine_windows"]) == 3


# ---------------------------------------------------------------------------------------------------------
# learning: the tiny preset trained on synthetic blobs localizes held-out blobs to < 1 voxel


def blob_volume(shape: tuple[int, int, int], centre_voxel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright Gaussian blob (sigma 2 voxels) at ``centre_voxel`` in Gaussian noise."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    blob = np.exp(-((grid - centre_voxel) ** 2).sum(-1) / (2 * 2.0**2))
    return (2.0 * blob + rng.normal(0.0, 0.3, size=shape)).astype(np.float32)


def random_centre(shape: tuple[int, int, int], region_origin: np.ndarray, size: int, rng) -> np.ndarray:
    """A blob centre at least 6 voxels inside both the volume and the central coarse region."""
    low = np.maximum(6, region_origin + 6)
    high = np.minimum(np.array(shape) - 7, region_origin + size - 7)
    return rng.uniform(low, high)


COARSE_STEPS = 400
FINE_STEPS = 500
FINE_OFFSET_VOXEL = 4.0  # fine training windows: centred within this many voxels of the landmark
BATCH = 8  # twice the preset's 4: at this size a step costs about the same, and learning is faster


@pytest.mark.slow
def test_tiny_preset_learns_to_localize_blobs_to_below_one_voxel():
    config = load_preset("tiny")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size, stride = config.coarse.padded_size, config.coarse.input_stride
    window, n, batch = config.fine.window_size, config.superresolution, BATCH
    shape = (size,) * 3
    prepare = tf.function(lambda v: preprocess(v, config.spacing_mm, config.highpass_sigma_mm))

    centres = [random_centre(shape, np.zeros(3), size, rng) for _ in range(160)]
    inputs = [prepare(blob_volume(shape, c, rng)).numpy() for c in centres]

    def coarse_batch():
        volumes, classes = [], []
        for i in rng.integers(0, len(inputs), batch):
            shift = rng.integers(-config.coarse.offset_range_voxel, config.coarse.offset_range_voxel + 1, 3)
            origin = centered_window_origin(np.array(shape), size) + shift
            volumes.append(crop_with_padding(inputs[i], origin, (size,) * 3))
            classes.append(window_voxel_to_class(centres[i] - origin, size, n, stride))
        classes = np.array(classes, np.int32)
        return {"volume": np.stack(volumes)}, {a: classes[:, None, j] for j, a in enumerate("xyz")}

    def fine_batch():
        windows, classes = [], []
        for i in rng.integers(0, len(inputs), batch):
            origin = window_origin_around(centres[i] + rng.uniform(-FINE_OFFSET_VOXEL, FINE_OFFSET_VOXEL, 3), window)
            windows.append(crop_with_padding(inputs[i], origin, (window,) * 3))
            classes.append(window_voxel_to_class(centres[i] - origin, window, n, 1))
        classes = np.array(classes, np.int32)
        return {"window": np.stack(windows)}, {a: classes[:, None, j] for j, a in enumerate("xyz")}

    start, cpu_start = time.perf_counter(), time.process_time()
    coarse = N.compile_for_training(N.build_coarse_model(config), config)
    fine = N.compile_for_training(N.build_fine_model(config), config)
    coarse_losses = [coarse.train_on_batch(*coarse_batch())[0] for _ in range(COARSE_STEPS)]
    fine_losses = [fine.train_on_batch(*fine_batch())[0] for _ in range(FINE_STEPS)]
    print(f"training: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu_start:.1f} s CPU")
    losses = [(np.mean(x[:50]), np.mean(x[-50:])) for x in (coarse_losses, fine_losses)]
    print("loss, first/last 50 steps: coarse {:.2f} -> {:.2f}, fine {:.2f} -> {:.2f}".format(*losses[0], *losses[1]))
    assert all(last < 0.85 * first for first, last in losses)

    # Held-out volumes of other shapes: the coarse region is padded (x) or cut from the middle (y).
    localizer = TwoStageLocalizer(coarse, fine, config)
    test_rng = np.random.default_rng(99)
    errors, coarse_errors = [], []
    for test_shape in [(28, 36, 32), (32, 32, 32), (30, 34, 29)] * 4:
        origin = centered_window_origin(np.array(test_shape), size)
        centre = random_centre(test_shape, origin, size, test_rng)
        result = localizer(blob_volume(test_shape, centre, test_rng))
        errors.append(np.linalg.norm(result["voxel"].numpy()[0] - centre))
        coarse_errors.append(np.linalg.norm(result["coarse_voxel"].numpy()[0] - centre))
    print(f"mean error: coarse {np.mean(coarse_errors):.2f} voxel, fine {np.mean(errors):.2f} voxel")
    print("errors (coarse, fine):", " ".join(f"({c:.1f}, {f:.2f})" for c, f in zip(coarse_errors, errors)))
    assert np.mean(errors) < 1.0, errors
    assert np.mean(errors) < np.mean(coarse_errors), (errors, coarse_errors)


def test_second_fine_pass_centres_the_windows_on_the_first_fine_estimates(tiny3, rng):
    config, coarse, fine, localizer = tiny3
    volume = rng.normal(size=(30, 34, 28)).astype(np.float32)
    first = localizer(volume)
    two = TwoStageLocalizer(coarse, fine, config, fine_passes=2)(volume)
    again = localizer.fine(volume, first["voxel"])  # the fine stage around the first pass's answer
    for key in ("voxel", "voxel_argmax", "confidence", "window_origin_voxel"):
        np.testing.assert_allclose(two[key].numpy(), again[key].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two["coarse_voxel"].numpy(), first["coarse_voxel"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(
        two["window_origin_voxel"].numpy(), window_origin_around(first["voxel"].numpy(), config.fine.window_size)
    )
    with pytest.raises(ValueError, match="fine_passes"):
        TwoStageLocalizer(coarse, fine, config, fine_passes=0)


# ---------------------------------------------------------------------------------------------------------
# left-right flip averaging and pass averaging (random weights: exact bookkeeping, not accuracy)


def test_mirror_permutation_pairs_afids_names_and_keeps_the_midline():
    from mdgru_keras.localizer import mirror_permutation

    names = ["AC", "RMB", "LMB", "PMJ", "RLVAC", "LLVAC", "RIGO", "LOSF"]  # LOSF's partner is missing
    index = mirror_permutation(names)
    assert [names[i] for i in index] == ["AC", "LMB", "RMB", "PMJ", "LLVAC", "RLVAC", "RIGO", "LOSF"]
    np.testing.assert_array_equal(index[index], np.arange(len(names)))  # an involution


@pytest.fixture(scope="module")
def mirrored_pair():
    """The tiny preset with a left/right pair and a midline landmark, plain and flip-averaged localizers."""
    config = with_landmarks(load_preset("tiny"), ["RX", "M", "LX"])
    keras.utils.set_random_seed(5)
    coarse, fine = N.build_coarse_model(config), N.build_fine_model(config)
    return config, TwoStageLocalizer(coarse, fine, config), TwoStageLocalizer(coarse, fine, config, flip_average=True)


def _mirror(voxel: np.ndarray, size_x: int) -> np.ndarray:
    """Positions in the x-reversed volume, rows swapped as RX <-> LX (landmarks RX, M, LX)."""
    mirrored = np.asarray(voxel, np.float64)[[2, 1, 0]].copy()
    mirrored[:, 0] = size_x - 1 - mirrored[:, 0]
    return mirrored


def test_flip_average_is_the_mean_of_the_direct_and_the_mirrored_estimates(mirrored_pair, rng):
    config, plain, flipped = mirrored_pair
    volume = rng.normal(size=(29, 33, 27)).astype(np.float32)
    centre = np.array([[8.0, 15, 12], [14, 17, 13], [20, 14, 12]], np.float32)
    direct = plain.fine(volume, centre)
    mirrored = plain.fine(volume[::-1].copy(), _mirror(centre, 29).astype(np.float32))
    both = flipped.fine(volume, centre)
    for key in ("voxel", "voxel_argmax", "voxel_n1_parabola"):
        expected = 0.5 * (direct[key].numpy() + _mirror(mirrored[key].numpy(), 29))
        np.testing.assert_allclose(both[key].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(
        both["flip_disagreement_voxel"].numpy(),
        np.linalg.norm(direct["voxel"].numpy() - _mirror(mirrored["voxel"].numpy(), 29), axis=-1),
        atol=1e-4,
    )
    assert int(both["fine_windows"]) == 6 and float(np.max(direct["flip_disagreement_voxel"])) == 0.0
    # the probabilities and windows reported are the direct pass's
    np.testing.assert_allclose(both["probabilities_y"].numpy(), direct["probabilities_y"].numpy(), atol=1e-6)


def test_flip_averaged_fine_stage_commutes_with_mirroring_the_scan(mirrored_pair, rng):
    config, _, flipped = mirrored_pair
    volume = rng.normal(size=(31, 30, 28)).astype(np.float32)
    centre = np.array([[9.0, 14, 13], [15, 15, 14], [21, 16, 12]], np.float32)
    a = flipped.fine(volume, centre)["voxel"].numpy()
    b = flipped.fine(volume[::-1].copy(), _mirror(centre, 31).astype(np.float32))["voxel"].numpy()
    np.testing.assert_allclose(_mirror(b, 31), a, atol=1e-4)
    assert not np.allclose(a[0], a[2])  # the two sides are different estimates, not one copied


def test_averaged_passes_are_an_ensemble_centred_on_the_running_mean(mirrored_pair, rng):
    config, plain, _ = mirrored_pair
    coarse, fine = plain.coarse_model, plain.fine_model
    volume = rng.normal(size=(30, 34, 28)).astype(np.float32)
    averaged = TwoStageLocalizer(coarse, fine, config, fine_passes=3, average_passes=True)(volume)
    first = plain(volume)
    second = plain.fine(volume, first["voxel"])
    mean2 = 0.5 * (first["voxel"].numpy() + second["voxel"].numpy())
    third = plain.fine(volume, mean2.astype(np.float32))
    expected = (first["voxel"].numpy() + second["voxel"].numpy() + third["voxel"].numpy()) / 3
    np.testing.assert_allclose(averaged["voxel"].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(
        averaged["window_origin_voxel"].numpy(), window_origin_around(mean2, config.fine.window_size)
    )


def test_pass_views_and_shared_refinement_windows_are_that_ensemble_for_less(mirrored_pair, rng):
    """``pass_views`` with ``refine_share_margin_voxel``: the first pass is the plain localizer's (centred
    windows), the later ones look at the scan, its mirror image alone (estimates mapped back) or both (averaged)
    through shared windows, each centred on the mean so far; the answer is the mean of all passes, and the flip
    disagreement is the distance of the newest estimates from the scan and from the mirror image."""
    config, plain, _ = mirrored_pair
    coarse, fine = plain.coarse_model, plain.fine_model
    volume = rng.normal(size=(30, 34, 28)).astype(np.float32)
    size_x = volume.shape[0]
    first = plain(volume)
    shared = TwoStageLocalizer(coarse, fine, config, share_windows_margin_voxel=2)
    shared_both = TwoStageLocalizer(coarse, fine, config, flip_average=True, share_windows_margin_voxel=2)

    def mirror_only(centre):  # the mirror image's pass, mapped back (landmarks RX, M, LX)
        out = shared.fine(volume[::-1].copy(), _mirror(centre, size_x).astype(np.float32))
        back = {key: _mirror(out[key].numpy(), size_x) for key in ("voxel", "voxel_argmax", "voxel_n1_parabola")}
        back["confidence"] = out["confidence"].numpy()[[2, 1, 0]]
        return back

    keys = ("voxel", "voxel_argmax", "voxel_n1_parabola", "confidence")
    for views in (("scan", "both"), ("scan", "mirror", "scan")):
        cheap = TwoStageLocalizer(coarse, fine, config, fine_passes=len(views), pass_views=views,
                                  average_passes=True, refine_share_margin_voxel=2)(volume)
        passes = [{key: first[key].numpy() for key in keys}]
        latest = {"scan": first["voxel"].numpy()}
        for view in views[1:]:
            centre = np.mean([one["voxel"] for one in passes], axis=0).astype(np.float32)
            if view == "mirror":
                one = mirror_only(centre)
            else:
                out = (shared_both if view == "both" else shared).fine(volume, centre)
                one = {key: out[key].numpy() for key in keys}
                windows = int(out["fine_windows"])
            if view == "both":
                latest = {"scan": shared.fine(volume, centre)["voxel"].numpy(), "mirror": mirror_only(centre)["voxel"]}
            else:
                latest[view] = one["voxel"]
            passes.append(one)
        for key in keys:
            np.testing.assert_allclose(cheap[key].numpy(), np.mean([one[key] for one in passes], axis=0), atol=1e-4)
        disagreement = np.linalg.norm(latest["scan"] - latest["mirror"], axis=-1)
        np.testing.assert_allclose(cheap["flip_disagreement_voxel"].numpy(), disagreement, atol=1e-4)
        assert float(np.max(disagreement)) > 0
        assert int(cheap["fine_windows"]) == windows  # the last pass's
    for views, problem in ((("scan", "mirror"), "end with a pass that sees the scan"),
                           (("scan", "sideways"), "pass_views must be 2 of"),
                           (("scan",), "pass_views must be 2 of")):
        with pytest.raises(ValueError, match=problem):
            TwoStageLocalizer(coarse, fine, config, fine_passes=2, pass_views=views)
    with pytest.raises(ValueError, match="refine_share_margin_voxel"):
        TwoStageLocalizer(coarse, fine, config, fine_passes=2, refine_share_margin_voxel=config.fine.window_size)


def test_pooled_decoding_answers_with_the_classes_pooled_to_one_per_voxel(tiny3, rng):
    config, coarse, fine, localizer = tiny3
    volume = rng.normal(size=(30, 34, 28)).astype(np.float32)
    plain = localizer(volume)
    pooled = TwoStageLocalizer(coarse, fine, config, pooled_decoding=True)(volume)
    np.testing.assert_allclose(pooled["voxel"].numpy(), plain["voxel_n1_parabola"].numpy(), atol=1e-5)
    assert not np.allclose(plain["voxel"].numpy(), plain["voxel_n1_parabola"].numpy(), atol=1e-3)
    for key in ("voxel_parabola", "voxel_n1_parabola", "coarse_voxel", "confidence"):
        np.testing.assert_allclose(pooled[key].numpy(), plain[key].numpy(), atol=1e-5)


def test_protocol_planes_project_only_the_final_estimates_of_the_ventricle_landmarks(rng):
    """``protocol_planes``: every fine decoding is the plain one with RLVAC / RLVPC moved onto the coronal
    planes of its own AC / PC estimates (geometry.protocol_planes); the coarse stage and confidence unchanged."""
    from mdgru_keras.geometry.protocol_planes import project_onto_planes

    names = ["AC", "PC", "RLVAC", "RLVPC", "M"]
    config = with_landmarks(load_preset("tiny"), names)
    keras.utils.set_random_seed(9)
    coarse, fine = N.build_coarse_model(config), N.build_fine_model(config)
    plain = TwoStageLocalizer(coarse, fine, config, fine_passes=2)
    planes = TwoStageLocalizer(coarse, fine, config, fine_passes=2, protocol_planes=True)
    volume = rng.normal(size=(30, 32, 28)).astype(np.float32)
    expected, result = plain(volume), planes(volume)
    for key in ("voxel", "voxel_argmax", "voxel_parabola", "voxel_n1_argmax", "voxel_n1_parabola"):
        np.testing.assert_allclose(result[key].numpy(), project_onto_planes(expected[key].numpy(), names),
                                   atol=1e-4)
    assert not np.allclose(result["voxel"].numpy()[2:4], expected["voxel"].numpy()[2:4], atol=1e-3)
    for key in ("coarse_voxel", "confidence", "flip_disagreement_voxel"):
        np.testing.assert_array_equal(result[key].numpy(), expected[key].numpy())
    with pytest.raises(ValueError, match="protocol_planes needs AC, PC"):
        TwoStageLocalizer(coarse, fine, with_landmarks(config, ["AC", "M", "RLVAC", "X", "Y"]), protocol_planes=True)


def _eight_landmark_models(seed: int) -> tuple[list[str], object, keras.Model, keras.Model]:
    """The tiny preset with 8 landmarks (enough for the shape prior's affine fit), random weights from ``seed``."""
    names = ["A", "B", "C", "D", "E", "F", "G", "H"]
    config = with_landmarks(load_preset("tiny"), names)
    keras.utils.set_random_seed(seed)
    return names, config, N.build_coarse_model(config), N.build_fine_model(config)


def test_shape_prior_recentres_the_strayed_landmarks_and_drops_their_first_estimates(rng):
    """``shape_prior``: after the first pass, a landmark farther than the tolerance from the robust affine fit of
    the reference to the first estimates (geometry.shape_prior) gets its second window centred on that prior,
    and its answer is the second pass's alone; the others are centred and averaged as without the prior. A
    tolerance that no landmark exceeds changes nothing."""
    from mdgru_keras.geometry.shape_prior import fit_shape_prior

    names, config, coarse, fine = _eight_landmark_models(11)
    reference = rng.uniform(-20, 20, size=(len(names), 3))
    volume = rng.normal(size=(34, 30, 32)).astype(np.float32)
    one_pass = TwoStageLocalizer(coarse, fine, config)
    first = one_pass(volume)["voxel"].numpy().astype(np.float64)
    distance_mm = np.linalg.norm(first - fit_shape_prior(reference, first), axis=1) * config.spacing_mm
    tolerance_mm = float(np.median(distance_mm))
    strayed = distance_mm > tolerance_mm
    assert 0 < strayed.sum() < len(names)

    options = {"fine_passes": 2, "average_passes": True}
    checked = TwoStageLocalizer(coarse, fine, config, shape_prior=reference, shape_prior_tolerance_mm=tolerance_mm,
                                **options)(volume)
    centres = np.where(strayed[:, None], fit_shape_prior(reference, first), first)
    second = one_pass.fine(volume, tf.constant(centres, tf.float32))
    expected = np.where(strayed[:, None], second["voxel"].numpy(), 0.5 * (first + second["voxel"].numpy()))
    np.testing.assert_allclose(checked["voxel"].numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(checked["window_origin_voxel"].numpy(), second["window_origin_voxel"].numpy())
    final = checked["voxel"].numpy().astype(np.float64)
    np.testing.assert_allclose(checked["shape_prior_distance_voxel"].numpy(),
                               np.linalg.norm(final - fit_shape_prior(reference, final), axis=1), atol=1e-3)

    plain = TwoStageLocalizer(coarse, fine, config, **options)(volume)
    lenient = TwoStageLocalizer(coarse, fine, config, shape_prior=reference, shape_prior_tolerance_mm=1e4,
                                **options)(volume)
    for key in ("voxel", "voxel_n1_parabola", "confidence"):
        np.testing.assert_allclose(lenient[key].numpy(), plain[key].numpy(), atol=1e-5)
    np.testing.assert_array_equal(plain["shape_prior_distance_voxel"].numpy(), np.zeros(len(names)))

    with pytest.raises(ValueError, match="fine_passes >= 2"):
        TwoStageLocalizer(coarse, fine, config, shape_prior=reference)
    with pytest.raises(ValueError, match=r"\[8, 3\]"):
        TwoStageLocalizer(coarse, fine, config, shape_prior=reference[:5], fine_passes=2)
    few = with_landmarks(config, names[:4])
    with pytest.raises(ValueError, match="at least 6 landmarks"):
        TwoStageLocalizer(N.build_coarse_model(few), N.build_fine_model(few), few, shape_prior=reference[:4],
                          fine_passes=2)


@pytest.mark.parametrize("aligned", ["rotation", "affine"])
def test_aligned_windows_are_cut_along_the_shape_prior_fit_and_decoded_back(aligned, rng):
    """``aligned_windows``: the second pass's windows are placed in the frame of the robust affine fit of the
    reference to the first estimates (its rotation, or its linear part), sampled trilinearly along those axes,
    and the decoded window positions are mapped back to volume voxels. Rebuilt here with NumPy and SciPy from the
    first pass's estimates and the fine network alone."""
    from scipy import ndimage

    from mdgru_keras.geometry.shape_prior import fit_affine

    names, config, coarse, fine = _eight_landmark_models(13)
    # random reference points: the fit to random-weight estimates is far from the volume's axes (asserted below)
    reference = rng.uniform(-12, 12, size=(len(names), 3))
    volume = rng.normal(size=(34, 30, 32)).astype(np.float32)
    first = TwoStageLocalizer(coarse, fine, config)(volume)["voxel"].numpy().astype(np.float64)
    localizer = TwoStageLocalizer(coarse, fine, config, fine_passes=2, shape_prior=reference,
                                  shape_prior_tolerance_mm=1e4, aligned_windows=aligned)
    result = {k: v.numpy() for k, v in localizer(volume).items()}

    fit = fit_affine(reference, first)
    linear = fit[:3].T
    if aligned == "rotation":
        u, _, vt = np.linalg.svd(linear)
        linear = u @ np.diag([1, 1, np.sign(np.linalg.det(u @ vt))]) @ vt
        np.testing.assert_allclose(linear @ linear.T, np.eye(3), atol=1e-9)
    anchor = fit[3]
    size = config.fine.window_size
    frame_voxel = np.linalg.solve(linear, (first - anchor).T).T
    origins = window_origin_around(frame_voxel, size)  # one window per landmark (no sharing)
    features = preprocess(volume, config.spacing_mm, config.highpass_sigma_mm).numpy()
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    windows = []
    for origin in origins:
        points = (grid + origin) @ linear.T + anchor  # volume voxels of the window's voxels
        # zero outside the volume, interpolated up to it (the localizer's padding)
        channels = [ndimage.map_coordinates(features[..., c], points.T, order=1, mode="grid-constant", cval=0.0)
                    for c in range(2)]
        windows.append(np.stack(channels, -1).reshape(size, size, size, 2))
    logits = fine({"window": np.stack(windows).astype(np.float32)})
    probabilities = np.stack([tf.nn.softmax(logits[a]).numpy()[np.arange(8), np.arange(8)] for a in "xyz"], 1)
    np.testing.assert_allclose(result["probabilities_x"], probabilities[:, 0], atol=1e-4)
    in_frame = decode_axis(probabilities.astype(np.float64), config.superresolution, 1, True) + origins
    np.testing.assert_allclose(result["voxel"], in_frame @ linear.T + anchor, atol=2e-3)
    assert np.max(np.abs(linear - np.eye(3))) > 0.05  # really turned, not the volume's own axes

    with pytest.raises(ValueError, match="aligned_windows needs a shape_prior"):
        TwoStageLocalizer(coarse, fine, config, fine_passes=2, aligned_windows=aligned)
    with pytest.raises(ValueError, match="aligned_windows must be one of"):
        TwoStageLocalizer(coarse, fine, config, fine_passes=2, shape_prior=reference, aligned_windows="shear")
