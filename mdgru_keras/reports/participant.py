"""One participant's QC page: for each of its scans a summary table of the landmarks, then for each landmark the
axial, coronal and sagittal slices through it with its marker (:mod:`mdgru_keras.reports.panels`)."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from mdgru_keras.figures import AXIS_NAMES, VIEWS, percentile_window
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io.atomic import write_text_atomic
from mdgru_keras.io.nifti import read_volume, world_space_note
from mdgru_keras.prediction import (
    DEFAULT_THRESHOLDS,
    STATUS_OK,
    QualityThresholds,
    ScanPrediction,
    lost_scan_note,
)
from mdgru_keras.reports import _html
from mdgru_keras.reports._html import esc
from mdgru_keras.reports.panels import MM_PER_PIXEL, PANEL_PX, encode_png, panel_indices
from mdgru_keras.reports.status import SEVERITY, STATUS_FAILED, status_flags, worst_status

REPORT_VIEWS = ("axial", "coronal", "sagittal")
DISPLAY_SCALE = 2  # panels are shown at this many screen pixels per image pixel (sharp: image-rendering pixelated)


def participant_report(
    out_html: str | Path,
    scans: Sequence[tuple[str | Path, ScanPrediction]],
    *,
    title: str | None = None,
    model_info: Mapping[str, object] | None = None,
    thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
    failed: Sequence[tuple[str | Path, str]] = (),
    panel_px: int = PANEL_PX,
    mm_per_pixel: float = MM_PER_PIXEL,
    generated: datetime.datetime | None = None,
) -> Path:
    """Write one participant's self-contained QC page (HTML, atomically) and return its path.

    Args:
        out_html: the page to write.
        scans: ``(image, prediction)`` per scan, e.g. sessions or T1w and T2w: the NIfTI file to show and the
            landmarks found in it. The points are placed by their ``world_mm`` (RAS), so ``image`` may be any
            scan in the same world space as the one localized (usually the same file, ``prediction.path``).
        title: the page title (default: the first image's file name).
        model_info: facts about the model shown in the header, e.g. ``{"name": ..., "version": ...,
            "created_at": ...}`` (:func:`mdgru_keras.reports.model_info_for_report`); values that are not strings
            or numbers are shown as compact JSON.
        thresholds: when a landmark is flagged (:class:`~mdgru_keras.prediction.QualityThresholds`); shown in
            the header.
        failed: ``(file, one-line error)`` for this participant's scans that could not be localized; listed.
        panel_px, mm_per_pixel: each slice panel is ``panel_px`` pixels of ``mm_per_pixel`` mm square, centred
            on its landmark (shown at twice the size).
        generated: the date shown (default: now).

    Raises :class:`~mdgru_keras.errors.InputError` when an image cannot be read, ``ValueError`` for bad
    arguments, ``OSError`` when the page cannot be written.

    Every landmark's three views show the file's voxels reoriented (exactly, no resampling) to the closest RAS
    orientation: the patient's right on the viewer's left (axial, coronal), anterior on the left (sagittal),
    superior or anterior up; letters at the edges say so. The page holds about 30 kB per landmark (1 mm scan).
    """
    if not scans and not failed:
        raise ValueError("participant_report needs at least one scan (or a failed one) to report")
    page_title = title if title is not None else Path(scans[0][0] if scans else failed[0][0]).name
    sections = [
        _scan_section(
            number, Path(image), prediction, thresholds, panel_px, mm_per_pixel
        )
        for number, (image, prediction) in enumerate(scans, start=1)
    ]
    statuses = [
        status for _, prediction in scans for status in prediction.statuses(thresholds)
    ]
    overall = STATUS_FAILED if failed else worst_status(statuses)
    flagged = sum(status != STATUS_OK for status in statuses)
    header_facts = [
        ("scans", ", ".join(Path(image).name for image, _ in scans) or "none localized"),
        ("landmarks flagged", f"{flagged} of {len(statuses)}"),
        *_html.model_facts(model_info),
        ("thresholds", thresholds.describe()),
        ("generated", _html.timestamp(generated)),
    ]
    failures = "".join(
        f'<li><span class="file">{esc(Path(path).name)}</span>: <span class="note">{esc(error)}</span></li>'
        for path, error in failed
    )
    body = (
        f"<header><h1>{esc(page_title)} {_html.badge(overall)}</h1>{_html.facts(header_facts)}"
        + (f"<h2>Scans that failed</h2><ul>{failures}</ul>" if failures else "")
        + _legend()
        + '<p><label><input type="checkbox" id="flagged-only"> show flagged landmarks only</label></p>'
        + "</header>\n<main>\n"
        + "\n".join(sections)
        + "\n</main>"
    )
    return write_text_atomic(out_html, _html.document(f"Landmark QC: {page_title}", body))


def _legend() -> str:
    items = "".join(f"<li>{_html.badge(status)} {esc(text)}</li>" for status, text in _html.STATUS_TEXT.items()
                    if status != STATUS_FAILED)  # fmt: skip
    return (
        '<details class="legend"><summary>How to read this page</summary><ul>'
        + items
        + "<li>Each landmark is shown on the slices through it (nearest voxel), in a square of the scan centred on "
        "it, marked by a crosshair in its status colour; dark blue is beyond the scan. Letters at the edges give "
        "the orientation (radiological: the patient's right on the viewer's left).</li></ul></details>"
    )


def _fmt(value: float, spec: str) -> str:
    return format(float(value), spec) if np.isfinite(value) else "n/a"


def _scan_section(
    number: int,
    image: Path,
    prediction: ScanPrediction,
    thresholds: QualityThresholds,
    panel_px: int,
    mm_per_pixel: float,
) -> str:
    volume = read_volume(image, spacing_mm=None)  # the file's voxels, reoriented exactly to RAS-canonical
    spacing = volume.spacing_mm
    window = percentile_window(volume.data)
    statuses = prediction.statuses(thresholds)
    points = affine_maps.world_to_voxel(prediction.world_mm, volume.voxel_to_world)
    orientation = "".join(nib.aff2axcodes(volume.file_voxel_to_world))
    flagged = sum(status != STATUS_OK for status in statuses)
    anchor = f"scan-{number}"
    file_spacing = " x ".join(f"{v:.3g}" for v in affine_maps.voxel_spacing_mm(volume.file_voxel_to_world))
    facts = [
        ("file", str(image)),
        ("array", f"{' x '.join(map(str, volume.file_shape))} voxels of {file_spacing} mm"),
        ("orientation", f"{orientation} in the file; shown reoriented to RAS"),
        ("landmarks flagged", f"{flagged} of {len(statuses)}"),
    ]
    if lost := lost_scan_note(statuses):
        facts.append(("warning", f"{lost}: check every landmark below by eye"))
    if world_space := world_space_note(image):
        facts.append(("world space", world_space))
    if Path(prediction.path).name != image.name:
        facts.insert(1, ("localized in", prediction.path))
    rows, figures = [], []
    coarse_shift_mm = prediction.coarse_shift_mm()
    for k, name in enumerate(prediction.landmark_names):
        landmark_id = f"s{number}-l{k + 1}"
        classes = _html.row_classes(statuses[k])
        world = ", ".join(_fmt(v, ".1f") for v in prediction.world_mm[k])
        rows.append(
            f'<tr class="{classes}"><td>{k + 1}</td><td class="name"><a href="#{landmark_id}">{esc(name)}</a></td>'
            + "".join(f"<td>{_fmt(v, '.1f')}</td>" for v in prediction.world_mm[k])
            + f"<td>{_fmt(prediction.confidence[k], '.3g')}</td>"
            f"<td>{_fmt(prediction.flip_disagreement_mm[k], '.1f')}</td>"
            f"<td>{_fmt(coarse_shift_mm[k], '.1f')}</td>"
            f'<td class="text">{_html.badge(statuses[k])}</td></tr>'
        )
        values = (
            f"RAS ({world}) mm &middot; voxel ({', '.join(_fmt(v, '.1f') for v in prediction.voxel[k])}) &middot; "
            f"confidence {_fmt(prediction.confidence[k], '.3g')} &middot; flip disagreement "
            f"{_fmt(prediction.flip_disagreement_mm[k], '.1f')} mm &middot; coarse shift "
            f"{_fmt(coarse_shift_mm[k], '.1f')} mm"
        )
        figures.append(
            f'<article class="landmark {classes}" id="{landmark_id}">'
            f"<h3>{k + 1}. {esc(name)} {_html.badge(statuses[k])}</h3>"
            f'<p class="values">{values}</p>'
            + _views(name, points[k], volume.data, spacing, window, statuses[k], panel_px, mm_per_pixel)
            + "</article>"
        )
    header = (
        f'<section class="scan" id="{anchor}"><h2>Scan {number}: <span class="file">{esc(image.name)}</span> '
        f"{_html.badge(worst_status(statuses))}</h2>{_html.facts(facts)}"
    )
    table = (
        '<table class="summary"><thead><tr><th>#</th><th class="name">landmark</th><th>x (mm)</th>'
        "<th>y (mm)</th><th>z (mm)</th><th>confidence</th><th>flip disagreement (mm)</th><th>coarse shift (mm)</th>"
        f'<th class="name">status</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )
    return f'{header}{table}<div class="landmarks">{"".join(figures)}</div></section>'


def _views(
    name: str,
    point_voxel: np.ndarray,
    volume: np.ndarray,
    spacing_mm: np.ndarray,
    window: tuple[float, float],
    status: str,
    panel_px: int,
    mm_per_pixel: float,
) -> str:
    """The three views of one landmark as figures with data-URI PNGs and orientation letters."""
    if not np.isfinite(point_voxel).all():
        return '<p class="note">No position to show (the model gave a non-finite coordinate).</p>'
    flags = status_flags(status)
    marker = max(flags, key=SEVERITY.__getitem__) if flags else STATUS_OK
    size = panel_px * DISPLAY_SCALE
    figures = []
    for view_name in REPORT_VIEWS:
        view = VIEWS[view_name]
        indices, slice_index = panel_indices(
            volume, spacing_mm, point_voxel, view, window, marker=marker, panel_px=panel_px, mm_per_pixel=mm_per_pixel
        )
        data = base64.b64encode(encode_png(indices)).decode("ascii")
        axis = view.fixed_axis
        beyond = not (-0.5 <= point_voxel[axis] <= volume.shape[axis] - 0.5)
        caption = f"{view_name} {AXIS_NAMES[axis]} = {slice_index}" + (" (nearest slice)" if beyond else "")
        letters = "".join(
            f'<span class="o {side}">{letter}</span>'
            for side, letter in zip(("left", "right", "top", "bottom"), view.letters)
        )
        figures.append(
            f'<figure class="view {view_name}"><div class="frame">'
            f'<img src="data:image/png;base64,{data}" width="{size}" height="{size}" '
            f'alt="{esc(view_name)} slice through {esc(name)}">{letters}</div>'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    return f'<div class="views">{"".join(figures)}</div>'
