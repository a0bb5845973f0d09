"""Localization networks: paper sizes and parameter counts, K-landmark heads, loss, init, serialization."""

import concurrent.futures
import dataclasses
import math
import multiprocessing

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdgru_keras import networks as N
from mdgru_keras.config import load_preset, with_landmarks
from mdgru_keras.layers import CGRU, MDGRU, StridedConv3D


def layer_params(model: keras.Model, kind: type | tuple[type, ...]) -> int:
    return sum(layer.count_params() for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind))


# ---------------------------------------------------------------------------------------------------------
# the paper preset (built, never run: 302 M weights)


def _paper_model_facts(stage: str, landmarks: int) -> dict:
    """The paper model's shapes and Keras' parameter counts, from a model built in this (child) process."""
    config = with_landmarks(load_preset("paper"), [f"L{i}" for i in range(landmarks)])
    model = N.build_model(config, stage)
    heads = model.get_layer(f"{stage}_heads")
    facts = {
        "trunk_outputs": [tuple(layer.output.shape) for layer in model.layers if "voxelwise" in layer.name],
        "outputs": {name: tuple(t.shape) for name, t in zip("xyz", model.outputs)},
        "hidden_kernel": tuple(heads.hidden_kernel.shape),
        "output_kernel": tuple(heads.output_kernel.shape),
        "total": model.count_params(),
        "trunk_and_input_conv": layer_params(model, MDGRU) + layer_params(model, (keras.layers.Conv3D, StridedConv3D)),
        "heads": heads.count_params(),
    }
    if stage == "coarse":
        facts["input_conv_output"] = tuple(model.get_layer("coarse_input_conv").output.shape)
        facts["input_conv_kernel"] = tuple(model.get_layer("coarse_input_conv").kernel.shape)
    return facts


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "landmarks"), [("coarse", 1), ("coarse", 4), ("fine", 3)])
def test_paper_models_have_the_papers_shapes_and_parameter_counts(stage, landmarks):
    # Built in a child process: TensorFlow kept the memory of these models (3.7 GB after the first, 6 GB after
    # the three) for the rest of the process even after clear_session and gc, and a pytest worker runs many files.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        facts = pool.submit(_paper_model_facts, stage, landmarks).result()
    config = with_landmarks(load_preset("paper"), [f"L{i}" for i in range(landmarks)])
    # 256^3 padded, stride-4 conv to 64^3 (coarse) or a 64^3 window (fine): 8^3 x 192 features, n = 4.
    classes = 4 * 64  # n * 256 / 4 and n * 64 / 1
    assert facts["trunk_outputs"] == [(None, 32, 32, 32, 48), (None, 16, 16, 16, 96), (None, 8, 8, 8, 192)]
    if stage == "coarse":
        assert facts["input_conv_output"] == (None, 64, 64, 64, 16)
        assert facts["input_conv_kernel"] == (9, 9, 9, 2, 16)
    assert facts["outputs"] == {axis: (None, landmarks, classes) for axis in "xyz"}
    assert facts["hidden_kernel"] == (8**3 * 192, 3 * classes * 4)  # the 302 M-weight layer
    assert facts["output_kernel"] == (landmarks, 3 * classes * 4, 3 * classes)
    # Keras' count equals the analytic one, part by part.
    counts = N.count_parameters(config, stage)
    assert facts["total"] == counts["total"]
    assert facts["trunk_and_input_conv"] == counts["trunk"] + counts["input_conv"]
    assert facts["heads"] == counts["head_hidden"] + counts["head_output"]
    # K landmarks share the trunk and the hidden layer: each extra landmark adds only an output layer.
    one = N.count_parameters(with_landmarks(config, ["A"]), stage)["total"]
    assert counts["total"] - one == (landmarks - 1) * (3 * classes * 4 * 3 * classes + 3 * classes)


def test_analytic_parameter_counts_match_keras_for_other_sizes():
    config = load_preset("tiny")
    for landmarks in (1, 5):
        for stage in ("coarse", "fine"):
            cfg = with_landmarks(config, [f"L{i}" for i in range(landmarks)])
            assert N.build_model(cfg, stage).count_params() == N.count_parameters(cfg, stage)["total"]


# ---------------------------------------------------------------------------------------------------------
# small models: behaviour


@pytest.fixture(scope="module")
def tiny3():
    config = with_landmarks(load_preset("tiny"), ["A", "B", "C"])
    return config, N.build_coarse_model(config), N.build_fine_model(config)


def test_forward_shapes_and_head_selection(tiny3, rng):
    config, coarse, fine = tiny3
    p, w = config.coarse.padded_size, config.fine.window_size
    c_coarse = N.stage_classes(config, "coarse")[0]
    c_fine = N.stage_classes(config, "fine")[0]
    out = coarse({"volume": rng.normal(size=(2, p, p, p, 2)).astype("float32")})
    assert {k: tuple(v.shape) for k, v in out.items()} == {a: (2, 3, c_coarse) for a in "xyz"}
    windows = rng.normal(size=(3, w, w, w, 2)).astype("float32")
    index = np.array([2, 0, 1], np.int32)
    every = fine({"window": windows})
    assert {k: tuple(v.shape) for k, v in every.items()} == {a: (3, 3, c_fine) for a in "xyz"}
    # The split trunk + heads (how the localizer reads one landmark per window): sample b with landmark
    # index[b]'s output layer is the same as evaluating all landmarks and picking that one.
    trunk, heads = N.split_fine_model(fine)
    out = heads(trunk(windows), index)
    assert {k: tuple(v.shape) for k, v in out.items()} == {a: (3, c_fine) for a in "xyz"}
    for axis in "xyz":
        np.testing.assert_allclose(out[axis].numpy(), every[axis].numpy()[np.arange(3), index], rtol=1e-5, atol=1e-5)
        # different landmarks really give different outputs
        assert not np.allclose(every[axis].numpy()[:, 0], every[axis].numpy()[:, 1])


def test_initialization_follows_the_paper(tiny3):
    config, coarse, fine = tiny3
    for model in (coarse, fine):
        heads = [layer for layer in model.layers if isinstance(layer, N.LandmarkHeads)][0]
        for kernel in (heads.hidden_kernel, heads.output_kernel):
            values = kernel.numpy()
            limit = math.sqrt(3.0 / kernel.shape[-2])
            assert np.abs(values).max() <= limit
            assert np.abs(values).max() > 0.9 * limit  # really uniform over the whole range
        assert not heads.hidden_bias.numpy().any() and not heads.output_bias.numpy().any()
        for layer in model._flatten_layers(include_self=False):
            if isinstance(layer, (keras.layers.Conv3D, StridedConv3D)):
                assert not layer.bias.numpy().any()
                fan_in = np.prod(layer.kernel.shape[:-1])
                fan_out = np.prod(layer.kernel.shape[:-2]) * layer.kernel.shape[-1]
                assert np.abs(layer.kernel.numpy()).max() <= math.sqrt(6.0 / (fan_in + fan_out)) + 1e-6
            if isinstance(layer, CGRU):
                assert not layer.bias.numpy().any()


def test_dropconnect_only_while_training(tiny3, rng):
    config, _, fine = tiny3
    w = config.fine.window_size
    inputs = {"window": rng.normal(size=(1, w, w, w, 2)).astype("float32")}
    a, b = fine(inputs, training=False)["x"].numpy(), fine(inputs, training=False)["x"].numpy()
    np.testing.assert_array_equal(a, b)
    c, d = fine(inputs, training=True)["x"].numpy(), fine(inputs, training=True)["x"].numpy()
    assert not np.allclose(c, d)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_the_sum_over_axes_and_landmarks_of_cross_entropies(tiny3, rng):
    config, coarse, fine = tiny3
    p = config.coarse.padded_size
    c = N.stage_classes(config, "coarse")[0]
    inputs = {"volume": rng.normal(size=(2, p, p, p, 2)).astype("float32")}
    labels = {a: rng.integers(0, c, size=(2, 3)).astype(np.int32) for a in "xyz"}
    logits = coarse(inputs)
    expected = 0.0
    for axis in "xyz":
        lp = log_softmax(logits[axis].numpy().astype(np.float64))
        picked = np.take_along_axis(lp, labels[axis][..., None], -1)[..., 0]  # [B, K]
        expected += -picked.sum(axis=1).mean()  # summed over landmarks, mean over the batch
    assert float(N.localization_loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    N.compile_for_training(coarse, config)
    assert float(coarse.compute_loss(x=inputs, y=labels, y_pred=logits)) == pytest.approx(expected, rel=1e-5)


def test_compile_uses_the_configured_optimizer():
    paper = load_preset("paper")
    optimizer = N.make_optimizer(paper)
    assert isinstance(optimizer, keras.optimizers.Adadelta)
    assert float(optimizer.learning_rate) == pytest.approx(0.001)
    assert isinstance(N.make_optimizer(load_preset("tiny")), keras.optimizers.Adam)


def test_models_save_and_load_as_keras_files(tiny3, tmp_path, rng):
    config, coarse, fine = tiny3
    w = config.fine.window_size
    inputs = {"window": rng.normal(size=(2, w, w, w, 2)).astype("float32")}
    path = tmp_path / "fine.keras"
    fine.save(path)
    loaded = N.load_model(str(path))
    for axis in "xyz":
        np.testing.assert_allclose(loaded(inputs)[axis].numpy(), fine(inputs)[axis].numpy(), rtol=1e-6, atol=1e-6)
    # get_config round trip rebuilds the same architecture
    rebuilt = keras.Model.from_config(coarse.get_config(), custom_objects=N.custom_objects())
    assert rebuilt.count_params() == coarse.count_params()


def test_parameter_memory_of_the_paper_preset_for_1_and_32_landmarks():
    paper = load_preset("paper")
    afids = with_landmarks(paper, [f"AFID{i:02d}" for i in range(1, 33)])
    one = N.count_parameters(paper, "fine")
    many = N.count_parameters(afids, "fine")
    assert one["head_hidden"] == 8**3 * 192 * 3072 + 3072  # ~302 M: the reason the hidden layer is shared
    # 32 landmarks cost less than 1.3 x one landmark (instead of 32 x)
    assert many["total"] < 1.3 * one["total"]
    assert N.parameter_bytes(one["total"]) > 1.2e9


def test_soft_label_loss_is_the_kl_divergence_from_a_truncated_gaussian(tiny3, rng):
    config, coarse, _ = tiny3
    p = config.coarse.padded_size
    c = N.stage_classes(config, "coarse")[0]
    sigma = 1.7
    inputs = {"volume": rng.normal(size=(2, p, p, p, 2)).astype("float32")}
    labels = {a: rng.integers(0, c, size=(2, 3)).astype(np.int32) for a in "xyz"}
    logits = coarse(inputs)
    expected = 0.0
    classes = np.arange(c, dtype=np.float64)
    for axis in "xyz":
        target = np.exp(-0.5 * ((classes - labels[axis][..., None]) / sigma) ** 2)
        target /= target.sum(-1, keepdims=True)
        lp = log_softmax(logits[axis].numpy().astype(np.float64))
        kl = (target * (np.log(target) - lp)).sum(-1)  # [B, K]
        expected += kl.sum(axis=1).mean()
    assert float(N.localization_loss(labels, logits, label_sigma_classes=sigma)) == pytest.approx(expected, rel=1e-4)


def test_soft_label_loss_is_zero_for_the_target_and_grows_with_the_miss():
    labels = tf.constant([20], tf.int32)
    target = N.gaussian_class_targets(labels, 64, 2.0)
    assert float(tf.reduce_sum(target)) == pytest.approx(1.0, abs=1e-6)
    assert int(tf.argmax(target[0])) == 20
    perfect = tf.math.log(tf.maximum(target, 1e-30))  # logits whose softmax is the target
    assert float(N.soft_label_divergence(labels, perfect, 2.0)[0]) == pytest.approx(0.0, abs=1e-5)
    misses = [float(N.soft_label_divergence(tf.constant([20 + d]), perfect, 2.0)[0]) for d in (1, 3, 9)]
    assert 0 < misses[0] < misses[1] < misses[2]


def test_label_sigma_is_converted_to_classes_of_each_stages_grid(tiny3):
    config = tiny3[0]
    config = config.replace(training=dataclasses.replace(config.training, label_sigma_grid_voxel=2.0))
    n = config.superresolution
    # n classes per voxel of either stage's grid (fine: volume voxels; coarse: voxels after the input stride)
    assert N.label_sigma_classes(config) == pytest.approx(2.0 * n)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_masked_loss_matches_an_independent_numpy_computation(rng, sigma):
    """Per sample: sum over the landmarks inside the window (mask 1) of the three per-axis losses; landmarks
    outside contribute nothing, not even through their (clipped, meaningless) labels."""
    batch, landmarks, classes = 3, 4, 10
    logits = {a: rng.normal(size=(batch, landmarks, classes)).astype("float32") * 3 for a in "xyz"}
    labels = {a: rng.integers(0, classes, size=(batch, landmarks)).astype("int32") for a in "xyz"}
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], np.float32)

    def numpy_loss(label, logit):
        log_p = logit - logit.max() - np.log(np.exp(logit - logit.max()).sum())
        if sigma == 0:
            return -log_p[label]
        target = np.exp(-0.5 * ((np.arange(classes) - label) / (sigma * 1.0)) ** 2)
        target /= target.sum()
        return float(np.sum(target * (np.log(np.maximum(target, 1e-30)) - log_p)))

    expected = np.zeros(batch)
    for b in range(batch):
        for k in range(landmarks):
            if mask[b, k]:
                expected[b] += sum(numpy_loss(labels[a][b, k], logits[a][b, k].astype(np.float64)) for a in "xyz")
    got = N.masked_localization_loss(labels, logits, mask, sigma).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # an absent landmark gets no gradient
    variables = {a: tf.Variable(logits[a]) for a in "xyz"}
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(N.masked_localization_loss(labels, variables, mask, sigma))
    gradient = tape.gradient(loss, variables["x"]).numpy()
    assert np.all(gradient[mask == 0] == 0) and np.all(np.abs(gradient[mask == 1]).sum(-1) > 0)


# ---------------------------------------------------------------------------------------------------------
# marginal heads


def _with_head(config, head: str, stages=("coarse", "fine")):
    replaced = {
        stage: dataclasses.replace(
            getattr(config, stage), network=dataclasses.replace(getattr(config, stage).network, head=head)
        )
        for stage in stages
    }
    return dataclasses.replace(config, **replaced)


@pytest.fixture(scope="module")
def marginal3():
    config = _with_head(with_landmarks(load_preset("tiny"), ["A", "B", "C"]), "marginal")
    return config, N.build_coarse_model(config), N.build_fine_model(config)


def test_marginal_heads_are_log_sum_exps_of_per_cell_scores(marginal3, rng):
    """Every axis' logits against an independent NumPy computation from the trunk's feature map."""
    from scipy.special import logsumexp

    config, _, fine = marginal3
    w = config.fine.window_size
    windows = rng.normal(size=(2, w, w, w, 2)).astype("float32")
    every = fine({"window": windows})
    trunk, heads = N.split_fine_model(fine)
    features = trunk(windows).numpy()  # [B, G, G, G, F]
    grid = features.shape[1]
    cells = config.superresolution * config.fine.network.mdgru_stride
    assert grid * cells == N.stage_classes(config, "fine")[0]
    kernel, bias = heads.kernel.numpy(), heads.bias.numpy()  # [K, 3, F, S], [K, 3, S]
    for b in range(2):
        for k in range(3):
            scores = np.einsum("ijlf,afs->aijls", features[b], kernel[k]) + bias[k][:, None, None, None, :]
            expected = {
                "x": logsumexp(scores[0], axis=(1, 2)),
                "y": logsumexp(scores[1], axis=(0, 2)),
                "z": logsumexp(scores[2], axis=(0, 1)),
            }
            for axis in "xyz":
                np.testing.assert_allclose(
                    every[axis].numpy()[b, k], expected[axis].reshape(-1), rtol=1e-4, atol=1e-4
                )
    # one landmark per sample (the localizer's mode) reads the same numbers
    index = np.array([2, 0], np.int32)
    selected = heads(trunk(windows), index)
    for axis in "xyz":
        np.testing.assert_allclose(
            selected[axis].numpy(), every[axis].numpy()[np.arange(2), index], rtol=1e-5, atol=1e-5
        )


def test_marginal_heads_are_translation_equivariant(marginal3):
    """A window shifted by whole first-level cells moves every landmark's logits by that many cells, away from
    the window's border (the MD-GRU's padding makes the border differ)."""
    config, _, fine = marginal3
    _, heads = N.split_fine_model(fine)
    features = np.random.default_rng(3).normal(size=(1, 8, 8, 8, heads.kernel.shape[2])).astype("float32")
    shifted = np.roll(features, 2, axis=1)
    cells = heads.cell_classes
    a, b = heads(features)["x"].numpy(), heads(shifted)["x"].numpy()
    np.testing.assert_allclose(np.roll(a, 2 * cells, axis=-1), b, rtol=1e-5, atol=1e-5)


def test_level_mixed_marginal_features_equal_the_trunks(marginal3, tiny3, rng):
    """The localizer's inference form of the marginal trunk (each level mixed on its own grid, then upsampled
    and summed) gives the trunk's features; a dense trunk has no such form."""
    config = marginal3[0]
    trunk, _ = N.split_fine_model(N.build_fine_model(config))  # its own weights, changed below
    mix = trunk.get_layer("fine_mix")
    # a bias and weights far from their initial values, so that every level's slice of the kernel counts
    mix.bias.assign(rng.normal(size=mix.bias.shape).astype("float32"))
    mix.kernel.assign(rng.normal(size=mix.kernel.shape).astype("float32") * 0.3)
    levels = [layer for layer in trunk.layers if layer.name.startswith("fine_voxelwise")]
    assert len({layer.output.shape[1] for layer in levels}) == len(levels) > 1  # levels on different grids
    features = N.marginal_features_mixed_by_level(trunk)
    w = config.fine.window_size
    windows = rng.normal(size=(3, w, w, w, 2)).astype("float32")
    expected = trunk(windows, training=False).numpy()
    np.testing.assert_allclose(features(tf.constant(windows)).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 0.5  # a real signal, not saturated zeros
    assert N.marginal_features_mixed_by_level(N.split_fine_model(tiny3[2])[0]) is None


def test_marginal_models_count_save_and_load(marginal3, tmp_path, rng):
    config, coarse, fine = marginal3
    for stage, model in (("coarse", coarse), ("fine", fine)):
        assert model.count_params() == N.count_parameters(config, stage)["total"]
    path = tmp_path / "fine.keras"
    fine.save(path)
    loaded = N.load_model(str(path))
    w = config.fine.window_size
    windows = rng.normal(size=(2, w, w, w, 2)).astype("float32")
    np.testing.assert_allclose(
        loaded({"window": windows})["z"].numpy(), fine({"window": windows})["z"].numpy(), rtol=1e-5, atol=1e-5
    )
