"""Figures: slices through landmarks with markers (like Fig. 3 of Andermatt et al. 2017) and loss curves
(like their Fig. 2). Rendered with matplotlib's Agg backend (no display needed), written atomically as PNG.

Slice orientation follows the radiological convention of 3D Slicer's slice views, for volumes ``[x, y, z]``
in RAS-canonical voxel order (what :func:`mdgru_keras.io.read_volume` returns); :data:`VIEWS` holds it for every
figure and report that draws slices (:mod:`mdgru_keras.reports` too):

* sagittal (x = const): anterior on the left, superior up;
* coronal (y = const): the patient's right on the viewer's left, superior up;
* axial (z = const): the patient's right on the viewer's left, anterior up.

Every view thus puts the larger RAS coordinate of its horizontal axis on the left and that of its vertical axis
at the top. Pixels have the voxels' physical aspect ratio (a 1 x 1 x 3 mm scan is not squashed), and every panel
is marked with its orientation letters (R/L, A/P, S/I) in yellow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.resampling import closest_canonical_orientation
from mdgru_keras.io.atomic import atomic_path

# Label colours and marker shapes in order of the labels given (e.g. ground truth, prediction, baseline).
LABEL_COLORS = ("#00ff00", "#ff0000", "#00bfff", "#ffa500", "#ff00ff")
LABEL_MARKERS = ("o", "+", "x", "s", "D")
ORIENTATION_COLOR = "#ffff00"
TEXT_COLOR = "0.85"
BACKGROUND = "black"
HEADER_PX = 64  # title and legend above the panels
DPI = 100


@dataclass(frozen=True)
class SliceView:
    """How one view shows a RAS-canonical volume ``[x, y, z]``: the slice is ``fixed_axis = const``; the screen's
    horizontal runs along ``horizontal_axis`` with the larger coordinate on the left, its vertical along
    ``vertical_axis`` with the larger coordinate at the top. ``letters``: the orientation letters at the
    left, right, top and bottom edges."""

    name: str
    fixed_axis: int
    horizontal_axis: int
    vertical_axis: int
    letters: tuple[str, str, str, str]


VIEWS: dict[str, SliceView] = {
    "sagittal": SliceView("sagittal", 0, 1, 2, ("A", "P", "S", "I")),
    "coronal": SliceView("coronal", 1, 0, 2, ("R", "L", "S", "I")),
    "axial": SliceView("axial", 2, 0, 1, ("R", "L", "A", "P")),
}
AXIS_NAMES = ("x", "y", "z")


def landmark_figure_size_px(num_landmarks: int, panel_px: int = 320) -> tuple[int, int]:
    """``(width, height)`` in pixels of a :func:`landmark_figure` with ``num_landmarks`` rows."""
    return 2 * panel_px, num_landmarks * panel_px + HEADER_PX


def check_ras_canonical(voxel_to_world: np.ndarray, owner: str = "landmark_figure") -> None:
    """A ``ValueError`` unless the affine's voxel axes run closest to R, A and S, in that order."""
    world_axis, flip = closest_canonical_orientation(voxel_to_world)
    if list(world_axis) != [0, 1, 2] or flip.any():
        raise ValueError(f"{owner} expects a volume [x, y, z] in RAS-canonical order (as read_volume gives)")


def percentile_window(volume: np.ndarray) -> tuple[float, float]:
    """``(black, white)`` intensities of a volume: its 0.5th and 99.5th percentiles (its range if they agree)."""
    step = max(1, int(round((volume.size / 2e6) ** (1 / 3))))  # percentiles of ~2M voxels are plenty
    sample = volume[::step, ::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(sample, [0.5, 99.5])
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return float(low), float(high if high > low else low + 1.0)


def _orientation_letters(ax, left: str, right: str, top: str, bottom: str) -> None:
    style = {"color": ORIENTATION_COLOR, "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _style_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_facecolor(BACKGROUND)
    ax.set_xlabel(xlabel, color=TEXT_COLOR, fontsize=8, labelpad=1)
    ax.set_ylabel(ylabel, color=TEXT_COLOR, fontsize=8, labelpad=1)
    ax.set_title(title, color=TEXT_COLOR, fontsize=9, pad=3)
    ax.tick_params(colors=TEXT_COLOR, labelsize=7, length=2, pad=1)
    for spine in ax.spines.values():
        spine.set_color("0.4")


def landmark_figure(
    volume: np.ndarray,
    voxel_to_world: np.ndarray,
    points: Mapping[str, Mapping[str, Sequence[float]]],
    out_png: str | Path,
    title: str = "",
    *,
    panel_px: int = 320,
    colors: Mapping[str, str] | None = None,
    intensity_window: tuple[float, float] | None = None,
) -> Path:
    """Sagittal and axial slices through each landmark, with every label's marker.

    Args:
        volume: ``[x, y, z]`` in RAS-canonical voxel order.
        voxel_to_world: its 4x4 RAS affine (gives the pixel aspect and the distances in the titles).
        points: label (e.g. ``"ground truth"``, ``"prediction"``) -> landmark name -> continuous voxel ``(3,)``.
            The slices of a landmark pass through the nearest voxel of the *first* label that has it; the other
            labels' markers are drawn at their in-plane position, and each panel title gives their distance
            in mm from the first label's point.
        out_png: the PNG to write (atomically); its size is :func:`landmark_figure_size_px`.
        title: figure title.
        panel_px: edge of one panel in pixels.
        colors: label -> matplotlib colour, overriding the default green, red, blue, ... in label order.
        intensity_window: ``(black, white)`` intensities; default the volume's 0.5th and 99.5th percentiles.

    Returns the path written.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume [x, y, z], got shape {volume.shape}")
    voxel_to_world = np.asarray(voxel_to_world, dtype=np.float64)
    check_ras_canonical(voxel_to_world)
    labels = list(points)
    if not labels:
        raise ValueError("no points to draw")
    names = list(dict.fromkeys(name for label in labels for name in points[label]))
    if not names:
        raise ValueError("no landmarks to draw")
    colors = {label: (colors or {}).get(label, LABEL_COLORS[i % len(LABEL_COLORS)]) for i, label in enumerate(labels)}
    markers = {label: LABEL_MARKERS[i % len(LABEL_MARKERS)] for i, label in enumerate(labels)}
    spacing = affine_maps.voxel_spacing_mm(voxel_to_world)
    vmin, vmax = intensity_window if intensity_window is not None else percentile_window(volume)
    shape = volume.shape

    width_px, height_px = landmark_figure_size_px(len(names), panel_px)
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor=BACKGROUND)
    figure.text(0.5, 1 - 8 / height_px, title, ha="center", va="top", color=TEXT_COLOR, fontsize=12)
    handles = [
        Line2D([], [], linestyle="none", marker=markers[label], markersize=9, markeredgewidth=1.8,
               markeredgecolor=colors[label], markerfacecolor="none", label=label)
        for label in labels
    ]  # fmt: skip
    figure.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 28 / height_px), ncol=len(labels),
        frameon=False, labelcolor=TEXT_COLOR, fontsize=9, handletextpad=0.3, columnspacing=1.5,
    )  # fmt: skip

    # Each panel sits in a panel_px square cell; margins (px) leave room for the axis labels and title.
    left, right, bottom, top = 42, 10, 34, 22
    for row, name in enumerate(names):
        reference_label = next(label for label in labels if name in points[label])
        reference_voxel = np.asarray(points[reference_label][name], dtype=np.float64)
        slice_voxel = np.clip(np.floor(reference_voxel + 0.5).astype(int), 0, np.array(shape) - 1)
        reference_mm = affine_maps.voxel_to_world(reference_voxel, voxel_to_world)
        distances = []
        for label in labels:
            if label != reference_label and name in points[label]:
                label_mm = affine_maps.voxel_to_world(np.asarray(points[label][name], np.float64), voxel_to_world)
                distances.append(f"{label} {np.linalg.norm(label_mm - reference_mm):.1f} mm")
        suffix = f"  ({', '.join(distances)})" if distances else ""
        cell_bottom = height_px - HEADER_PX - (row + 1) * panel_px
        for column, view in enumerate((VIEWS["sagittal"], VIEWS["axial"])):
            rect = (
                (column * panel_px + left) / width_px,
                (cell_bottom + bottom) / height_px,
                (panel_px - left - right) / width_px,
                (panel_px - bottom - top) / height_px,
            )
            ax = figure.add_axes(rect)
            h_axis, v_axis, fixed = view.horizontal_axis, view.vertical_axis, view.fixed_axis
            # the two remaining axes in order (h_axis < v_axis in every view), transposed: rows along v_axis
            image = np.take(volume, slice_voxel[fixed], axis=fixed).T
            heading = f"{view.name} {AXIS_NAMES[fixed]} = {slice_voxel[fixed]}"
            if column == 0:
                heading = f"{name}{suffix}\n{heading}"
            _style_axes(ax, f"{AXIS_NAMES[h_axis]} (voxel)", f"{AXIS_NAMES[v_axis]} (voxel)", heading)
            ax.imshow(
                image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest",
                aspect=spacing[v_axis] / spacing[h_axis],
                extent=(-0.5, shape[h_axis] - 0.5, -0.5, shape[v_axis] - 0.5),
            )  # fmt: skip
            ax.set_xlim(shape[h_axis] - 0.5, -0.5)  # every view runs its horizontal axis backwards
            ax.set_ylim(-0.5, shape[v_axis] - 0.5)
            _orientation_letters(ax, *view.letters)
            for label in labels:
                if name not in points[label]:
                    continue
                voxel = np.asarray(points[label][name], dtype=np.float64)
                ax.plot(
                    [voxel[h_axis]], [voxel[v_axis]], linestyle="none", marker=markers[label], markersize=12,
                    markeredgewidth=1.8, markeredgecolor=colors[label], markerfacecolor="none",
                )  # fmt: skip
    return _save(figure, out_png)


def ema(values: Sequence[float], smoothing: float = 0.6) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing): ``s_t = a s_{t-1} +
    (1 - a) x_t`` from ``s_0 = 0``, divided by ``1 - a^t``; so the first value is kept and a constant stays."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    state = 0.0
    for t, value in enumerate(values, start=1):
        state = smoothing * state + (1.0 - smoothing) * value
        out[t - 1] = state / (1.0 - smoothing**t)
    return out


def loss_curve_figure(
    history: Sequence[Mapping[str, float | None]],
    out_png: str | Path,
    title: str = "Training",
    *,
    smoothing: float = 0.6,
    size_px: tuple[int, int] = (800, 500),
    log_y: bool | None = None,
) -> Path:
    """Training and validation loss against epochs: raw (faint) and smoothed (:func:`ema`, solid).

    ``history``: one dict per epoch with ``epoch``, ``loss`` and optionally ``val_loss`` (missing or None
    where no validation ran). ``log_y``: logarithmic loss axis; None chooses it when the positive losses
    span more than a factor of 20. Writes ``out_png`` atomically, ``size_px`` pixels; returns its path.
    """
    if not history:
        raise ValueError("empty history: nothing to plot")
    curves = {}
    for key, label in (("loss", "training"), ("val_loss", "validation")):
        pairs = [
            (float(entry["epoch"]), float(entry[key]))
            for entry in history
            if entry.get(key) is not None and np.isfinite(float(entry[key]))
        ]
        if key == "loss" and not pairs:
            raise ValueError("the history has no 'loss' values")
        if pairs:
            curves[label] = np.array(pairs)
    all_losses = np.concatenate([c[:, 1] for c in curves.values()])
    if log_y is None:
        log_y = bool(np.all(all_losses > 0) and all_losses.max() / all_losses.min() > 20.0)

    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, facecolor="white")
    ax = figure.add_axes((0.1, 0.12, 0.86, 0.8))
    for label, color in (("training", "tab:blue"), ("validation", "tab:orange")):
        if label not in curves:
            continue
        epochs, losses = curves[label][:, 0], curves[label][:, 1]
        ax.plot(epochs, losses, color=color, alpha=0.3, linewidth=1.0, label=f"{label} (raw)")
        ax.plot(epochs, ema(losses, smoothing), color=color, linewidth=2.0, label=f"{label} (EMA {smoothing:g})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    return _save(figure, out_png)


def _save(figure: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=DPI, format="png", facecolor=figure.get_facecolor())
    return out_png
