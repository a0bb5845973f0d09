"""Figures: PNG files of the promised size, markers where the voxels are, radiological orientation, aspect."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mdgru_keras.figures import (
    HEADER_PX,
    ema,
    landmark_figure,
    landmark_figure_size_px,
    loss_curve_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPACING = (1.0, 1.5, 2.0)  # anisotropic on purpose: the aspect must follow it
SHAPE = (48, 56, 40)
WINDOW = (0.0, 1.0)  # intensities shown black .. white


def scan_with_bright_voxel(bright_voxel: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-24.0, -40.0, -40.0]
    volume = rng.uniform(0.0, 0.3, SHAPE)  # dim noise: with WINDOW it renders dark grey, never white
    volume[bright_voxel] = 5.0  # renders pure white
    return volume, affine


def read_rgb(path) -> np.ndarray:
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def centroid(mask: np.ndarray) -> np.ndarray:
    """(column, row) centre of the True pixels."""
    rows, columns = np.nonzero(mask)
    assert rows.size > 0, "colour not found in the figure"
    return np.array([columns.mean(), rows.mean()])


def panels(rgb: np.ndarray, panel_px: int) -> dict[str, np.ndarray]:
    """The two panels of the first landmark row: sagittal (left cell), axial (right cell)."""
    row = rgb[HEADER_PX : HEADER_PX + panel_px]
    return {"sagittal": row[:, :panel_px], "axial": row[:, panel_px:]}


def green(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 1] > 180) & (rgb[..., 0] < 100) & (rgb[..., 2] < 100)


def red(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 180) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)


def white(rgb: np.ndarray) -> np.ndarray:
    return (rgb > 240).all(axis=-1)


@pytest.mark.parametrize("num_landmarks", [1, 3])
def test_landmark_figure_is_a_png_of_the_promised_size(tmp_path, rng, num_landmarks) -> None:
    volume, affine = scan_with_bright_voxel((10, 20, 30), rng)
    names = [f"L{i}" for i in range(num_landmarks)]
    points = {"ground truth": {n: [10 + i, 20, 30] for i, n in enumerate(names)}}
    out = tmp_path / "figure.png"
    assert landmark_figure(volume, affine, points, out, "test", panel_px=200) == out
    rgb = read_rgb(out)
    size = (rgb.shape[1], rgb.shape[0])
    assert size == landmark_figure_size_px(num_landmarks, 200) == (400, 200 * num_landmarks + 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]  # written atomically, nothing left over


def test_marker_sits_on_the_voxel_in_both_views(tmp_path, rng) -> None:
    bright = (30, 40, 12)
    volume, affine = scan_with_bright_voxel(bright, rng)
    out = tmp_path / "figure.png"
    landmark_figure(volume, affine, {"ground truth": {"AC": bright}}, out, "marker", intensity_window=WINDOW)
    for view, pixels in panels(read_rgb(out), 320).items():
        spot = centroid(white(pixels))
        marker = centroid(green(pixels))
        assert np.abs(marker - spot).max() <= 2.0, (view, marker, spot)
        # The spot is one voxel: a small block of pixels (about 4-6 px wide at this size), not a large area.
        assert 4 <= white(pixels).sum() <= 100, view


def test_radiological_orientation_and_physical_aspect(tmp_path, rng) -> None:
    truth = np.array([24.0, 28.0, 20.0])
    # The prediction lies 6 voxels to the patient's right (+x), anterior (+y) and superior (+z) of the truth.
    prediction = truth + 6.0
    volume, affine = scan_with_bright_voxel(tuple(truth.astype(int)), rng)
    out = tmp_path / "figure.png"
    landmark_figure(volume, affine, {"truth": {"PMJ": truth}, "prediction": {"PMJ": prediction}}, out, "orientation")
    views = panels(read_rgb(out), 320)
    offsets = {view: centroid(red(pixels)) - centroid(green(pixels)) for view, pixels in views.items()}
    # Image rows grow downwards: "up" is a negative row offset.
    # Sagittal: anterior on the viewer's left, superior up.
    d_column, d_row = offsets["sagittal"]
    assert d_column < -10 and d_row < -10
    assert -d_row / -d_column == pytest.approx(SPACING[2] / SPACING[1], rel=0.08)  # 6 voxels of 2 mm vs 1.5 mm
    # Axial: the patient's right on the viewer's left, anterior up.
    d_column, d_row = offsets["axial"]
    assert d_column < -10 and d_row < -10
    assert -d_row / -d_column == pytest.approx(SPACING[1] / SPACING[0], rel=0.08)  # 1.5 mm vs 1 mm


def test_landmark_figure_refuses_non_ras_volumes(tmp_path, rng) -> None:
    volume, affine = scan_with_bright_voxel((1, 1, 1), rng)
    affine[0, 0] = -1.0  # LAS
    with pytest.raises(ValueError, match="RAS"):
        landmark_figure(volume, affine, {"truth": {"A": (1, 1, 1)}}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ema() -> None:
    np.testing.assert_allclose(ema([2.0] * 5, 0.9), [2.0] * 5)  # bias-corrected: a constant stays constant
    values = [1.0, 0.0, 0.0]
    # s1 = 0.5 / 0.5 = 1; s2 = 0.25 / 0.75 = 1/3; s3 = 0.125 / 0.875 = 1/7
    np.testing.assert_allclose(ema(values, 0.5), [1.0, 1 / 3, 1 / 7])
    np.testing.assert_allclose(ema(values, 0.0), values)
    with pytest.raises(ValueError):
        ema(values, 1.0)


def curve_pixels(rgb: np.ndarray, color: tuple[int, int, int]) -> int:
    return int((np.abs(rgb - np.array(color)).max(axis=-1) < 30).sum())


TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)


def test_loss_curve_figure(tmp_path, rng) -> None:
    history = [
        {"epoch": e, "loss": 2.0 * np.exp(-e / 10) + 0.05 * rng.random(), "val_loss": 2.2 * np.exp(-e / 12)}
        for e in range(1, 41)
    ]
    out = tmp_path / "loss.png"
    loss_curve_figure(history, out, size_px=(640, 400))
    rgb = read_rgb(out)
    assert rgb.shape[:2] == (400, 640)
    assert curve_pixels(rgb, TAB_BLUE) > 300 and curve_pixels(rgb, TAB_ORANGE) > 300

    # Without validation values only the training curve is drawn.
    training_only = [{"epoch": h["epoch"], "loss": h["loss"], "val_loss": None} for h in history]
    loss_curve_figure(training_only, out, size_px=(640, 400))
    rgb = read_rgb(out)
    assert curve_pixels(rgb, TAB_BLUE) > 300 and curve_pixels(rgb, TAB_ORANGE) == 0

    with pytest.raises(ValueError, match="empty"):
        loss_curve_figure([], tmp_path / "empty.png")
