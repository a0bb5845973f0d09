"""Slice panels for the QC reports: a square crop of one slice through a landmark, with its marker, as a small
palette PNG.

A panel shows ``panel_px`` x ``panel_px`` pixels of ``mm_per_pixel`` millimetres (square pixels whatever the
voxel spacing: anisotropic scans are sampled, nearest voxel, not squashed) centred on the landmark: the
landmark lies at the centre of pixel ``(row, column) = (panel_px // 2, panel_px // 2)``, exactly, so the marker
(a crosshair with an open centre, drawn in the landmark's status colour) never hides the voxel it marks. The
volume is RAS-canonical (:func:`mdgru_keras.io.read_volume` with ``spacing_mm=None``: the file's voxels,
reoriented exactly), and the views follow :data:`mdgru_keras.figures.VIEWS`: the patient's right on the viewer's
left in the axial and coronal views, anterior on the left in the sagittal one, superior (axial: anterior) up.

Pixels beyond the scan are drawn in :data:`NO_DATA_RGB` (dark blue), so the edge of the field of view shows; a
landmark beyond the scan along the slice axis is shown on the nearest slice.

The PNG is 8-bit palette: :data:`GRAY_LEVELS` grey levels for the intensities, then the no-data and marker
colours (:data:`PALETTE`). A 100 x 100 panel of a head is about 5-7 kB.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image

from mdgru_keras.figures import VIEWS, SliceView

GRAY_LEVELS = 240  # palette indices 0 .. GRAY_LEVELS - 1: black .. white
NO_DATA_RGB = (24, 32, 56)
# Marker colours by the landmark's worst status (as the reports' badges).
MARKER_RGB: Mapping[str, tuple[int, int, int]] = {
    "ok": (0, 230, 90),
    "coarse_fine_disagree": (230, 220, 0),
    "low_confidence": (255, 200, 0),
    "unstable": (255, 120, 0),
    "outside_image": (255, 40, 40),
}
NO_DATA_INDEX = GRAY_LEVELS
MARKER_INDEX: Mapping[str, int] = {status: GRAY_LEVELS + 1 + i for i, status in enumerate(MARKER_RGB)}
PALETTE: tuple[int, ...] = tuple(
    value
    for rgb in (
        *((round(level * 255 / (GRAY_LEVELS - 1)),) * 3 for level in range(GRAY_LEVELS)),
        NO_DATA_RGB,
        *MARKER_RGB.values(),
    )
    for value in rgb
)
PANEL_PX = 100
MM_PER_PIXEL = 1.0


def marker_extent_px(panel_px: int) -> tuple[int, int]:
    """``(gap, arm)``: the crosshair's arms run from ``gap`` to ``arm`` pixels from the centre pixel."""
    gap = max(2, panel_px // 33)
    return gap, max(gap + 3, panel_px // 9)


def panel_indices(
    volume: np.ndarray,
    spacing_mm: np.ndarray,
    point_voxel: np.ndarray,
    view: SliceView | str,
    window: tuple[float, float],
    *,
    marker: str | None = "ok",
    panel_px: int = PANEL_PX,
    mm_per_pixel: float = MM_PER_PIXEL,
) -> tuple[np.ndarray, int]:
    """The palette indices ``uint8 [panel_px, panel_px]`` (rows top to bottom) of one view through a point, and
    the index of the slice shown.

    Args:
        volume: ``[x, y, z]`` RAS-canonical.
        spacing_mm: its voxel edge lengths ``[3]``.
        point_voxel: the landmark's continuous voxel coordinates ``[3]`` in ``volume`` (finite).
        view: a :class:`~mdgru_keras.figures.SliceView` or its name in :data:`~mdgru_keras.figures.VIEWS`.
        window: ``(black, white)`` intensities.
        marker: the status whose colour (:data:`MARKER_RGB`) the crosshair gets; ``None``: no marker.
        panel_px: edge of the panel in pixels (at least 16).
        mm_per_pixel: pixel size in mm.
    """
    view = VIEWS[view] if isinstance(view, str) else view
    point_voxel = np.asarray(point_voxel, dtype=np.float64)
    if point_voxel.shape != (3,) or not np.isfinite(point_voxel).all():
        raise ValueError(f"point_voxel must be 3 finite coordinates, got {point_voxel.tolist()}")
    if panel_px < 16:
        raise ValueError(f"panel_px must be at least 16, got {panel_px}")
    if not (np.isfinite(mm_per_pixel) and mm_per_pixel > 0):
        raise ValueError(f"mm_per_pixel must be positive, got {mm_per_pixel}")
    shape = volume.shape
    h_axis, v_axis, fixed_axis = view.horizontal_axis, view.vertical_axis, view.fixed_axis
    centre = panel_px // 2
    offset_mm = (np.arange(panel_px) - centre) * mm_per_pixel
    # Rightwards and downwards on screen, the coordinate falls (figures.VIEWS): larger R/A/S left and up.
    h_voxel = np.floor(point_voxel[h_axis] - offset_mm / spacing_mm[h_axis] + 0.5).astype(np.int64)
    v_voxel = np.floor(point_voxel[v_axis] - offset_mm / spacing_mm[v_axis] + 0.5).astype(np.int64)
    h_valid = (h_voxel >= 0) & (h_voxel < shape[h_axis])
    v_valid = (v_voxel >= 0) & (v_voxel < shape[v_axis])
    slice_index = int(np.clip(np.floor(point_voxel[fixed_axis] + 0.5), 0, shape[fixed_axis] - 1))
    index: list[object] = [slice_index] * 3
    index[h_axis] = np.clip(h_voxel, 0, shape[h_axis] - 1)[None, :]
    index[v_axis] = np.clip(v_voxel, 0, shape[v_axis] - 1)[:, None]
    values = np.asarray(volume[tuple(index)], dtype=np.float64)  # [rows, columns]
    black, white = window
    scaled = np.clip((values - black) / max(white - black, 1e-12), 0.0, 1.0) * (GRAY_LEVELS - 1)
    indices = np.floor(scaled + 0.5).astype(np.uint8)
    indices[~(v_valid[:, None] & h_valid[None, :])] = NO_DATA_INDEX
    if marker is not None:
        color = MARKER_INDEX[marker]
        gap, arm = marker_extent_px(panel_px)
        steps = np.arange(gap, arm + 1)
        for rows, columns in (
            (centre - steps, centre),
            (centre + steps, centre),
            (centre, centre - steps),
            (centre, centre + steps),
        ):
            indices[rows, columns] = color
    return indices, slice_index


def encode_png(indices: np.ndarray) -> bytes:
    """An 8-bit palette PNG (:data:`PALETTE`) of ``indices`` ``uint8 [rows, columns]``."""
    indices = np.ascontiguousarray(indices, dtype=np.uint8)
    rows, columns = indices.shape
    image = Image.frombuffer("P", (columns, rows), indices.tobytes(), "raw", "P", 0, 1)
    image.putpalette(PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()
