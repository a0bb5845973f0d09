"""A synthetic, labelled population made from one template scan with landmarks.

Each subject is the template with a random head size (anisotropic scaling), a random smooth elastic
deformation at two scales and a random rigid pose, with randomly changed tissue contrast (a piecewise-linear
intensity curve and a gamma), blurred or sharpened, acquired at a random resolution (1 mm, isotropic lower
resolution or thick slices) through a random field of view (centred on the head, or lower, reaching the
neck), with a smooth multiplicative bias field and Rician noise. The landmarks go through the same geometric
transform exactly; the intensity operations do not move them. What each option draws, and the ``train`` /
``heldout`` families for a generalization check, are described in ``docs/SYNTH.md``.

How the transform is built (coordinate math in :mod:`mdgru_keras.data.deformation` and
:mod:`mdgru_keras.geometry`):

* The forward affine ``A`` (template world -> subject world) scales each template axis about the template
  centre, then rotates about it and translates: ``A(x) = R S (x - c) + c + t``.
* The image is resampled through the *pull-back* map from subject world to template world,
  ``template_mm = A^-1(subject_mm + u(subject_mm))``, where ``u`` is the sum of two displacement fields (a
  fine and a large-scale one) on one coarse control grid (``elastic_grid_mm``) fixed in subject world,
  interpolated trilinearly.
* The landmarks take the *forward* map: ``z = A(template_mm)``, then ``y + u(y) = z`` is solved for ``y`` by
  fixed-point iteration (:func:`~mdgru_keras.data.deformation.invert_displacement`), with the very same trilinear
  ``u`` the image sees, so they agree to 1e-6 mm.
* With ``protocol_planes``, the lateral ventricles' four AFIDs are labelled as a rater following the protocol
  would: where the moved ventricle edge (the template's line through the point along AC-PC) meets the subject's
  coronal plane of AC or PC (:mod:`mdgru_keras.geometry.protocol_planes`). The image is the same either way
  (its field of view is placed around where the template's points went).
* Speed: the pull-back is affine plus ``u``, and trilinear interpolation reproduces affine maps exactly, so
  the template-voxel coordinates are computed on the control grid only and upsampled separably to the
  subject grid (:func:`~mdgru_keras.geometry.resampling.resample_axis_aligned`); one ``map_coordinates`` (order 1)
  samples the template.
* Intensities are changed on the template side, before resampling (contrast curve and gamma through one
  lookup table, unsharp masking, then one Gaussian with the subject's acquisition blur mapped to template
  voxels), and on the subject grid after it (bias, noise). None of them moves a landmark.

Outside the template the image continues with its edge values (``mode="nearest"``): a field of view that
reaches below the template's last slice sees its lowest slice extended, a crude neck.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from mdgru_keras.data.deformation import interpolate_at, invert_displacement, rigid_affine
from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.protocol_planes import place_on_planes
from mdgru_keras.geometry.resampling import resample_axis_aligned
from mdgru_keras.io.atomic import write_text_atomic
from mdgru_keras.io.landmarks import check_landmarks_inside, read_landmarks, write_landmarks
from mdgru_keras.io.nifti import read_volume, write_volume

MANIFEST_NAME = "manifest.csv"
DESCRIPTION_NAME = "synth.json"

FAMILIES = ("all", "train", "heldout")
# Family split of every split range (see docs/SYNTH.md): "train" draws the lower FAMILY_SPLIT of its magnitude,
# "heldout" the rest, "all" the whole range; e.g. scale factors with max_scale 0.10: train [0.94, 1.06], heldout
# [0.90, 0.94) and (1.06, 1.10].
FAMILY_SPLIT = 0.6
# Knots of the contrast curve: the template's minimum, these percentiles of its foreground (voxels above 10 % of
# its 99th percentile), and its maximum; one random slope change per segment between knots.
CONTRAST_PERCENTILES = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0)
CONTRAST_SEGMENTS = len(CONTRAST_PERCENTILES) + 1
SHARPEN_SIGMA_MM = 1.0  # Gaussian of the unsharp mask
_LOOKUP_SIZE = 2048  # entries of the intensity lookup table (linear between entries)
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# Defacing (``SynthOptions.deface``): voxels whose template position lies below (z) the straight line through
# these two (y, z) points of the template's world, in mm, are set to 0 in the subject image, as defacing tools
# (pydeface, mri_deface) do. For MNI152NLin2009cAsym the line runs from 60 mm below AC at y = 40 mm to the tip of
# the nose at y = 96 mm (it leaves the template's field of view below y = 25 mm): eyes, nose, mouth and chin go,
# the frontal lobe and the orbital gyri stay.
DEFACE_LINE_YZ_MM = ((40.0, -60.0), (96.0, 10.0))


@dataclass(frozen=True)
class SynthOptions:
    """Random ranges of the synthetic population (defaults suit a 1 mm head template such as MNI 2009c and aim
    at real T1w scans: head sizes, contrasts, sharpness, resolutions and noise levels that the template lacks).

    Every ``max_*`` range and ``*_probability`` is switched off by 0. Ranges split by ``family`` are marked
    [family]; see ``docs/SYNTH.md``.
    """

    # geometry
    max_scale: float = 0.10  # [family] head size: each template axis scaled by a factor uniform in [1 - s, 1 + s]
    scale_centre: float = 1.0  # ... times this (e.g. 0.87: heads smaller than the template); no random draw
    max_rotation_deg: float = 15.0  # each Euler angle uniform in [-a, a]
    pitch_deg: tuple[float, float] | None = None  # the angle about x (left-right) in +-[low, high] instead: the
    # same draw, its magnitude mapped from [0, a] onto [low, high] (heads tilted more than max_rotation_deg)
    max_translation_mm: float = 20.0  # each axis uniform in [-t, t]
    elastic_mm: float = 3.0  # fine displacement field: standard deviation of each component
    elastic_smoothness_mm: float = 20.0  # Gaussian correlation length of the fine displacement field
    max_elastic_large_mm: float = 4.0  # [family] large-scale displacement field: std uniform in [0, this]
    elastic_large_smoothness_mm: float = 50.0  # its Gaussian correlation length
    elastic_grid_mm: float = 8.0  # control-grid spacing of both displacement fields
    # field of view and resolution
    neck_probability: float = 0.3  # field of view lowered (and taller), reaching the neck
    spacing_mm: float = 1.0  # voxel size (unless lowres; in plane for anisotropic subjects)
    lowres_probability: float = 0.3  # isotropic voxel size drawn from lowres_spacing_mm instead of spacing_mm
    lowres_spacing_mm: tuple[float, float] = (1.0, 1.6)  # [family] uniform range of that voxel size
    anisotropic_probability: float = 0.25  # one axis gets thick slices
    slice_thickness_mm: tuple[float, float] = (1.5, 4.0)  # [family] uniform range of that axis' spacing
    # appearance
    max_contrast_log_slope: float = 0.4  # [family] contrast curve: each segment's slope times exp(U[-c, c])
    strong_contrast_probability: float = 0.05  # a random, non-monotone curve instead (never in family train)
    max_log_gamma: float = 0.3  # [family] gamma exp(U[-g, g]) on intensities normalized to the 99th percentile
    sharpen_probability: float = 0.5  # unsharp mask (amount from max_sharpen), else Gaussian blur (max_blur_mm)
    max_sharpen: float = 1.0  # [family] unsharp-mask amount uniform in [0, this] (Gaussian sigma 1 mm)
    max_blur_mm: float = 1.2  # [family] Gaussian blur sigma uniform in [0, this]
    bias_std: float = 0.15  # log bias field: std at the nodes of a bias_grid^3 lattice over the field of view
    bias_grid: int = 4
    max_noise: float = 0.06  # [family] Rician noise sigma, uniform in [0, max_noise] x the 99th percentile
    image2_probability: float = 0.5  # chance of a subject from the second image (when one is given)
    deface: bool = False  # face removed (set to 0) after the noise, as defacing tools do
    deface_line_yz_mm: tuple[tuple[float, float], tuple[float, float]] = DEFACE_LINE_YZ_MM  # below it: the face
    family: str = "all"  # "all" (every range whole), "train" or "heldout" (disjoint parts; docs/SYNTH.md)
    # labels
    protocol_planes: bool = False  # RLVAC/LLVAC/RLVPC/LLVPC in the coronal planes of AC/PC (AFIDs), not moved
    # with the tissue (mdgru_keras.geometry.protocol_planes)
    # output
    landmark_margin_mm: float = 10.0  # every landmark at least this far inside the field of view
    image_suffix: str = ".nii"  # or ".nii.gz": noisy images shrink by only ~12 % and gzip triples the time
    landmark_format: str = "fcsv"  # or "mrk.json", "csv"

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_rotation_deg",
            "max_translation_mm",
            "elastic_mm",
            "max_elastic_large_mm",
            "max_contrast_log_slope",
            "max_log_gamma",
            "max_sharpen",
            "max_blur_mm",
            "bias_std",
            "max_noise",
        ):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("elastic_smoothness_mm", "elastic_large_smoothness_mm", "elastic_grid_mm", "spacing_mm"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.max_scale < 1:
            problems.append(f"max_scale must be in [0, 1), got {self.max_scale!r}")
        if not self.scale_centre > 0:
            problems.append(f"scale_centre must be > 0, got {self.scale_centre!r}")
        (y0, _), (y1, _) = self.deface_line_yz_mm
        if not y0 != y1:
            problems.append(f"deface_line_yz_mm needs two points of different y, got {self.deface_line_yz_mm!r}")
        if self.pitch_deg is not None and (len(self.pitch_deg) != 2 or not 0 <= self.pitch_deg[0] <= self.pitch_deg[1]):
            problems.append(f"pitch_deg must be (low, high) with 0 <= low <= high, got {tuple(self.pitch_deg)!r}")
        for name in (
            "neck_probability",
            "lowres_probability",
            "anisotropic_probability",
            "strong_contrast_probability",
            "sharpen_probability",
            "image2_probability",
        ):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("lowres_spacing_mm", "slice_thickness_mm"):
            value = getattr(self, name)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                problems.append(f"{name} must be (low, high) with 0 < low <= high, got {tuple(value)!r}")
        if self.bias_grid < 2:
            problems.append(f"bias_grid must be >= 2, got {self.bias_grid!r}")
        if self.family not in FAMILIES:
            problems.append(f"family must be all, train or heldout, got {self.family!r}")
        if self.image_suffix not in (".nii.gz", ".nii"):
            problems.append(f"image_suffix must be .nii.gz or .nii, got {self.image_suffix!r}")
        if self.landmark_format not in ("fcsv", "mrk.json", "csv"):
            problems.append(f"landmark_format must be fcsv, mrk.json or csv, got {self.landmark_format!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Template:
    """Template images (same grid, RAS-canonical) and landmarks (world mm)."""

    images: dict[str, np.ndarray]  # label (e.g. "T1w") -> data float32 [x, y, z]
    voxel_to_world: np.ndarray
    landmarks_world_mm: dict[str, np.ndarray]
    sources: dict[str, str] = field(default_factory=dict)  # label -> file

    @property
    def labels(self) -> list[str]:
        return list(self.images)

    def world_bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper world corners of the template grid's outer voxel faces (axis-aligned box)."""
        shape = np.asarray(next(iter(self.images.values())).shape)
        corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1).T
        world = affine_maps.voxel_to_world(corners, self.voxel_to_world)
        return world.min(axis=0), world.max(axis=0)


@dataclass
class Subject:
    """One synthetic subject: the image, its grid and landmarks (subject world mm), and what was drawn."""

    data: np.ndarray
    voxel_to_world: np.ndarray
    landmarks_world_mm: dict[str, np.ndarray]
    parameters: dict


def image_label(path: str | Path, fallback: str) -> str:
    """``T1w`` for ``tpl-..._T1w.nii.gz`` (the BIDS suffix); ``fallback`` when the name has no ``_``."""
    stem = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    label = stem.rsplit("_", 1)[-1] if "_" in stem else ""
    return label if label.isidentifier() else fallback


def load_template(image: str | Path, landmarks: str | Path, image2: str | Path | None = None) -> Template:
    """Read the template image(s) and landmarks; the second image must share the first one's grid."""
    first = read_volume(image, spacing_mm=None)
    label = image_label(image, "image")
    images = {label: first.data}
    sources = {label: str(image)}
    if image2 is not None:
        second = read_volume(image2, spacing_mm=None)
        if second.shape != first.shape or not np.allclose(second.voxel_to_world, first.voxel_to_world, atol=1e-3):
            raise InputError(image2, f"its voxel grid differs from {Path(image).name}'s; both must share one grid")
        label2 = image_label(image2, "image2")
        if label2 == label:
            label2 = f"{label2}2"
        images[label2] = second.data
        sources[label2] = str(image2)
    landmarks_world_mm = read_landmarks(landmarks)
    check_landmarks_inside(first, landmarks_world_mm, landmarks)
    return Template(images, first.voxel_to_world, landmarks_world_mm, sources)


# ---------------------------------------------------------------------------------------------------------
# one subject: the random parameters


def _fraction(rng: np.random.Generator, family: str, size: int | None = None) -> np.ndarray | float:
    """Uniform fractions of a split range: in [0, 1] for family ``all``, [0, FAMILY_SPLIT] for ``train`` and
    [FAMILY_SPLIT, 1] for ``heldout``."""
    uniform = rng.random(size)
    if family == "train":
        return FAMILY_SPLIT * uniform
    if family == "heldout":
        return FAMILY_SPLIT + (1.0 - FAMILY_SPLIT) * uniform
    return uniform


def _signed(rng: np.random.Generator, maximum: float, family: str, size: int | None = None) -> np.ndarray | float:
    """Uniform in ``[-maximum, maximum]``, the magnitude split by family (:func:`_fraction`), the sign random."""
    magnitude = maximum * _fraction(rng, family, size)
    return np.where(rng.random(size) < 0.5, -1.0, 1.0) * magnitude


def _in_range(rng: np.random.Generator, bounds: tuple[float, float], family: str) -> float:
    """Uniform in ``[low, high]``, split by family: the lower part for ``train``, the upper for ``heldout``."""
    low, high = bounds
    return float(low + (high - low) * _fraction(rng, family))


def sample_parameters(options: SynthOptions, rng: np.random.Generator) -> dict:
    """The random scalars of one subject, JSON-ready (the displacement fields, the field of view's placement,
    the bias field and the noise are drawn later, in :func:`make_subject`).

    Every call consumes the same random numbers whatever the options, so switching one option off (or
    changing the family) leaves all other draws of a seed as they were.
    """
    family = options.family
    scale = options.scale_centre * (1.0 + _signed(rng, options.max_scale, family, 3))
    rotation_deg = rng.uniform(-options.max_rotation_deg, options.max_rotation_deg, 3)
    if options.pitch_deg is not None:  # the same draw: its sign kept, its magnitude mapped onto [low, high]
        low, high = options.pitch_deg
        fraction = abs(rotation_deg[0]) / options.max_rotation_deg if options.max_rotation_deg > 0 else 0.5
        rotation_deg[0] = (-1.0 if rotation_deg[0] < 0 else 1.0) * (low + (high - low) * fraction)
    translation_mm = rng.uniform(-options.max_translation_mm, options.max_translation_mm, 3)
    elastic_large_mm = options.max_elastic_large_mm * float(_fraction(rng, family))
    # resolution: isotropic lower resolution, then possibly one thick axis
    lowres = bool(rng.random() < options.lowres_probability)
    lowres_spacing_mm = _in_range(rng, options.lowres_spacing_mm, family)
    anisotropic = bool(rng.random() < options.anisotropic_probability)
    thick_axis = int(rng.integers(3))
    thickness_mm = _in_range(rng, options.slice_thickness_mm, family)
    spacing_mm = np.full(3, lowres_spacing_mm if lowres else options.spacing_mm)
    if anisotropic:
        spacing_mm[thick_axis] = max(thickness_mm, spacing_mm[thick_axis])
    # contrast: a monotone curve with changed slopes, or (rarely, never in family train) a random one
    log_slopes = _signed(rng, options.max_contrast_log_slope, family, CONTRAST_SEGMENTS)
    strong_probability = 0.0 if family == "train" else options.strong_contrast_probability
    strong = bool(rng.random() < strong_probability)
    strong_values = rng.random(CONTRAST_SEGMENTS)
    gamma = float(np.exp(_signed(rng, options.max_log_gamma, family)))
    # sharpness: unsharp mask or Gaussian blur
    sharpened = bool(rng.random() < options.sharpen_probability)
    sharpen_amount = options.max_sharpen * float(_fraction(rng, family))
    blur_sigma_mm = options.max_blur_mm * float(_fraction(rng, family))
    noise_fraction = options.max_noise * float(_fraction(rng, family))
    parameters = {
        "family": family,
        "scale": scale.tolist(),
        "rotation_deg": rotation_deg.tolist(),
        "translation_mm": translation_mm.tolist(),
        "elastic_large_mm": elastic_large_mm,
        "lowres": lowres,
        "thick_axis": thick_axis if anisotropic else None,
        "spacing_mm": spacing_mm.tolist(),
        "contrast": "strong" if strong else "monotone",
    }
    if strong:
        parameters["contrast_values"] = strong_values.tolist()
    else:
        parameters["contrast_log_slopes"] = log_slopes.tolist()
    parameters.update(
        gamma=gamma,
        sharpen_amount=sharpen_amount if sharpened else 0.0,
        blur_sigma_mm=0.0 if sharpened else blur_sigma_mm,
        noise_fraction=noise_fraction,
    )
    return parameters


# ---------------------------------------------------------------------------------------------------------
# one subject: geometry


def _control_grid(template: Template, options: SynthOptions) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Origin (world mm) and shape of the displacement control grid: the template's box grown on every side
    by half its extent (more for larger heads) plus the largest translation, so that every field of view lies
    inside it."""
    low, high = template.world_bounds_mm()
    margin = (0.5 + options.max_scale) * (high - low) + options.max_translation_mm + options.landmark_margin_mm
    origin = low - margin
    shape = tuple(int(np.ceil((high - low + 2 * margin)[a] / options.elastic_grid_mm)) + 1 for a in range(3))
    return origin, shape


def _displacement_field(
    shape: tuple[int, int, int], std_mm: float, smoothness_mm: float, grid_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Smooth random displacement ``[L1, L2, L3, 3]`` (mm) on the control grid: white noise through a periodic
    Gaussian of correlation length ``smoothness_mm``, scaled so that each component's expected std is
    ``std_mm``. On a grid not much larger than the correlation length the field tends to a random shift (its
    realized std is not forced to ``std_mm``: dividing by it would blow a nearly constant field up). The
    random numbers are drawn even for ``std_mm == 0``, so that switching one field off leaves the later draws
    alone."""
    noise = rng.standard_normal((3, *shape))
    field = np.zeros((*shape, 3), np.float64)
    if std_mm == 0:
        return field
    sigma_nodes = smoothness_mm / grid_mm
    kernel_norm = 1.0  # root sum of squares of the periodic 3D kernel: the std of filtered unit white noise
    for n in shape:
        delta = np.zeros(n)
        delta[0] = 1.0
        kernel_norm *= float(np.sqrt(np.sum(ndimage.gaussian_filter1d(delta, sigma_nodes, mode="wrap") ** 2)))
    for component in range(3):
        smooth = ndimage.gaussian_filter(noise[component], sigma_nodes, mode="wrap")
        field[..., component] = smooth * (std_mm / kernel_norm)
    return field


def _field_of_view(
    head_box_mm: tuple[np.ndarray, np.ndarray],
    landmarks_mm: np.ndarray,
    grid_box: tuple[np.ndarray, np.ndarray],
    spacing: np.ndarray,
    options: SynthOptions,
    rng: np.random.Generator,
) -> tuple[tuple[int, int, int], np.ndarray, dict]:
    """Shape and first-voxel-centre world position ``[3]`` of a random field of view around the (scaled)
    template box ``head_box_mm``, with voxel size ``spacing [3]``."""
    low, high = head_box_mm
    extent = high - low
    centre = 0.5 * (low + high) + rng.uniform(-0.05, 0.05, 3) * extent
    size_mm = extent * rng.uniform(0.9, 1.05, 3)
    neck = bool(rng.random() < options.neck_probability)
    if neck:
        size_mm[2] = extent[2] * rng.uniform(1.0, 1.25)
        centre[2] -= extent[2] * rng.uniform(0.1, 0.2)
    else:
        size_mm[2] = extent[2] * rng.uniform(0.85, 1.0)
    # all landmarks at least margin inside: grow, then shift the box [centre - size/2, centre + size/2]
    need_low = landmarks_mm.min(axis=0) - options.landmark_margin_mm
    need_high = landmarks_mm.max(axis=0) + options.landmark_margin_mm
    size_mm = np.maximum(size_mm, need_high - need_low + spacing)
    shape = np.maximum(np.round(size_mm / spacing).astype(int), 1)
    size_mm = shape * spacing
    centre = np.clip(centre, need_high - size_mm / 2, need_low + size_mm / 2)
    # ... and inside the control grid (where the pull-back stays exact)
    box_low, box_high = grid_box
    centre = np.clip(centre, box_low + size_mm / 2, box_high - size_mm / 2)
    first_voxel_mm = centre - size_mm / 2 + spacing / 2
    return tuple(int(n) for n in shape), first_voxel_mm, {"neck": neck, "shape": shape.tolist()}


# ---------------------------------------------------------------------------------------------------------
# one subject: appearance (intensity only; nothing here moves a landmark)


def contrast_knots(volume: np.ndarray) -> np.ndarray:
    """Input knots of the contrast curve, ``[CONTRAST_SEGMENTS + 1]`` non-decreasing intensities: the minimum,
    the ``CONTRAST_PERCENTILES`` of the foreground (above 10 % of the 99th percentile) and the maximum."""
    step = 3 if volume.size > 2_000_000 else 1
    sample = volume[::step, ::step, ::step].ravel()
    foreground = sample[sample > 0.1 * np.percentile(sample, 99)]
    if foreground.size == 0:
        foreground = sample
    knots = np.concatenate([[volume.min()], np.percentile(foreground, CONTRAST_PERCENTILES), [volume.max()]])
    return np.maximum.accumulate(knots.astype(np.float64))


def contrast_curve(knots: np.ndarray, parameters: dict) -> np.ndarray:
    """Output intensities at the ``knots``: the minimum stays; a ``monotone`` curve multiplies each segment's
    slope by ``exp(log_slope)``, a ``strong`` one puts each later knot at a random fraction of the range
    minimum..99th percentile."""
    low = knots[0]
    if parameters["contrast"] == "strong":
        return low + (knots[-2] - low) * np.concatenate([[0.0], parameters["contrast_values"]])
    slopes = np.exp(np.asarray(parameters["contrast_log_slopes"]))
    return low + np.concatenate([[0.0], np.cumsum(np.diff(knots) * slopes)])


def remap_intensities(volume: np.ndarray, knots: np.ndarray, values: np.ndarray, gamma: float) -> np.ndarray:
    """``volume`` through the piecewise-linear curve ``knots -> values``, then the ``gamma`` on intensities
    normalized to the range minimum..99th percentile (``knots[0]..knots[-2]``); one lookup table, linear
    between its entries."""
    low, high = float(knots[0]), float(knots[-1])
    if not high > low:
        return volume
    span = float(knots[-2] - low) if knots[-2] > low else high - low
    table = np.interp(np.linspace(low, high, _LOOKUP_SIZE), knots, values)
    table = (low + span * np.clip((table - low) / span, 0.0, None) ** gamma).astype(np.float32)
    position = (volume - np.float32(low)) * np.float32((_LOOKUP_SIZE - 1) / (high - low))
    np.clip(position, 0, _LOOKUP_SIZE - 1, out=position)
    index = np.minimum(position.astype(np.int32), _LOOKUP_SIZE - 2)
    position -= index  # the weight of the upper entry
    position *= np.diff(table)[index]
    position += table[index]
    return position


def sharpen(volume: np.ndarray, amount: float, voxel_to_world: np.ndarray) -> np.ndarray:
    """Unsharp mask: ``volume + amount * (volume - gaussian(volume))`` (sigma ``SHARPEN_SIGMA_MM``), never
    below the volume's minimum."""
    sigma_voxel = SHARPEN_SIGMA_MM / affine_maps.voxel_spacing_mm(voxel_to_world)
    detail = volume - ndimage.gaussian_filter(volume, sigma_voxel, mode="nearest")
    detail *= np.float32(amount)
    detail += volume
    return np.maximum(detail, volume.min(), out=detail)


def acquisition_sigma_voxel(
    voxel_to_world: np.ndarray, forward: np.ndarray, spacing_mm: np.ndarray, blur_sigma_mm: float
) -> np.ndarray:
    """Per-axis Gaussian sigma (template voxels) that makes the template look acquired with the subject's
    voxels: along each subject axis FWHM = its spacing (less the template's own voxel size) plus an isotropic
    ``blur_sigma_mm``, a covariance in subject mm mapped through the linear part of the pull-back to template
    voxels, of which the diagonal is kept (an axis-aligned Gaussian)."""
    native_mm = float(np.mean(affine_maps.voxel_spacing_mm(voxel_to_world)))
    spacing_mm = np.asarray(spacing_mm, dtype=np.float64)
    variance_mm2 = np.maximum(spacing_mm**2 - native_mm**2, 0.0) / _FWHM_PER_SIGMA**2 + blur_sigma_mm**2
    subject_mm_to_voxel = np.linalg.inv(voxel_to_world[:3, :3]) @ np.linalg.inv(forward[:3, :3])
    covariance = subject_mm_to_voxel @ np.diag(variance_mm2) @ subject_mm_to_voxel.T
    return np.sqrt(np.diag(covariance))


def _appearance(
    volume: np.ndarray, voxel_to_world: np.ndarray, forward: np.ndarray, spacing_mm: np.ndarray, drawn: dict
) -> np.ndarray:
    """The template image as this subject shows it before resampling: contrast and gamma, sharpening, then
    the acquisition blur (see :func:`acquisition_sigma_voxel`)."""
    identity = drawn["contrast"] == "monotone" and not np.any(drawn["contrast_log_slopes"])
    if not (identity and drawn["gamma"] == 1.0):
        knots = contrast_knots(volume)
        volume = remap_intensities(volume, knots, contrast_curve(knots, drawn), drawn["gamma"])
    if drawn["sharpen_amount"] > 0:
        volume = sharpen(volume, drawn["sharpen_amount"], voxel_to_world)
    sigma_voxel = acquisition_sigma_voxel(voxel_to_world, forward, spacing_mm, drawn["blur_sigma_mm"])
    if sigma_voxel.max() > 1e-3:
        volume = ndimage.gaussian_filter(volume, sigma_voxel, mode="nearest")
    return volume


# ---------------------------------------------------------------------------------------------------------
# one subject


@dataclass
class _Geometry:
    """The geometric draws of one subject (the first random numbers :func:`make_subject` consumes)."""

    label: str
    drawn: dict
    centre: np.ndarray
    scale: np.ndarray
    forward: np.ndarray  # template world -> subject world (before the elastic displacement)
    grid_origin: np.ndarray
    grid_shape: tuple[int, int, int]
    displacement: np.ndarray  # [*grid_shape, 3] on the control grid, subject world
    tissue_mm: np.ndarray  # [K, 3] subject world, where the template's landmarks went (template order)
    landmarks_mm: np.ndarray  # [K, 3] the labels: tissue_mm, or with protocol_planes, some on their planes


def _draw_geometry(template: Template, options: SynthOptions, rng: np.random.Generator) -> _Geometry:
    labels = template.labels
    label = labels[1] if len(labels) > 1 and rng.random() < options.image2_probability else labels[0]
    drawn = sample_parameters(options, rng)
    # forward affine: template world -> subject world, scaling then rotation about the template centre
    low, high = template.world_bounds_mm()
    centre = 0.5 * (low + high)
    scale = np.asarray(drawn["scale"])
    linear = affine_maps.rotation_matrix(np.deg2rad(drawn["rotation_deg"])) @ np.diag(scale)
    forward = rigid_affine(linear, drawn["translation_mm"], centre)  # any linear part about the centre
    # elastic displacement u (fine + large-scale) on a control grid fixed in subject world
    grid_origin, grid_shape = _control_grid(template, options)
    grid_step = options.elastic_grid_mm
    displacement = _displacement_field(grid_shape, options.elastic_mm, options.elastic_smoothness_mm, grid_step, rng)
    displacement += _displacement_field(
        grid_shape, drawn["elastic_large_mm"], options.elastic_large_smoothness_mm, grid_step, rng
    )

    def displacement_at(subject_mm: np.ndarray) -> np.ndarray:
        return interpolate_at(displacement, (subject_mm - grid_origin) / grid_step)

    def to_subject(template_points_mm: np.ndarray) -> np.ndarray:
        """Template mm -> subject mm: the forward affine, then the displacement inverted at each point."""
        return invert_displacement(affine_maps.voxel_to_world(template_points_mm, forward), displacement_at)

    names = list(template.landmarks_world_mm)
    template_mm = np.stack([template.landmarks_world_mm[n] for n in names])
    tissue_mm = to_subject(template_mm)
    # protocol planes: as a rater places them, where the moved ventricle edge meets the moved plane
    landmarks_mm = place_on_planes(template_mm, names, to_subject) if options.protocol_planes else tissue_mm
    return _Geometry(label, drawn, centre, scale, forward, grid_origin, grid_shape, displacement, tissue_mm,
                     landmarks_mm)


def subject_landmarks(template: Template, options: SynthOptions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The landmarks (subject world mm) of the subject that :func:`make_subject` makes from the same ``rng``
    state, without making its image: how a population's labels are derived again under other label options
    (``protocol_planes``)."""
    geometry = _draw_geometry(template, options, rng)
    return {name: geometry.landmarks_mm[k] for k, name in enumerate(template.landmarks_world_mm)}


def make_subject(template: Template, options: SynthOptions, rng: np.random.Generator) -> Subject:
    """Draw one subject (see the module docstring)."""
    geometry = _draw_geometry(template, options, rng)
    label, drawn, centre, scale, forward = (geometry.label, geometry.drawn, geometry.centre, geometry.scale,
                                            geometry.forward)
    grid_origin, grid_shape, displacement = geometry.grid_origin, geometry.grid_shape, geometry.displacement
    grid_step = options.elastic_grid_mm
    low, high = template.world_bounds_mm()
    names = list(template.landmarks_world_mm)

    grid_box = (grid_origin, grid_origin + (np.asarray(grid_shape) - 1) * grid_step)
    spacing = np.asarray(drawn["spacing_mm"])
    head_box_mm = (centre - 0.5 * scale * (high - low), centre + 0.5 * scale * (high - low))
    # the field of view from where the tissue went: the image does not depend on how the labels are placed
    shape, first_voxel_mm, fov = _field_of_view(head_box_mm, geometry.tissue_mm, grid_box, spacing, options, rng)
    subject_affine = np.diag([*spacing, 1.0])
    subject_affine[:3, 3] = first_voxel_mm

    # pull-back on the control grid: template voxel of each control point, then upsampled to the subject grid
    node_mm = np.stack(
        np.meshgrid(*[grid_origin[a] + grid_step * np.arange(grid_shape[a]) for a in range(3)], indexing="ij"), -1
    )
    pull_back = np.linalg.inv(template.voxel_to_world) @ np.linalg.inv(forward)
    node_template_voxel = affine_maps.voxel_to_world(node_mm + displacement, pull_back).astype(np.float32)
    subject_to_node = np.eye(4)
    subject_to_node[:3, :3] = np.diag(spacing / grid_step)
    subject_to_node[:3, 3] = (first_voxel_mm - grid_origin) / grid_step
    coordinates = np.stack(
        [resample_axis_aligned(node_template_voxel[..., a], subject_to_node, shape) for a in range(3)]
    )
    source = _appearance(template.images[label], template.voxel_to_world, forward, spacing, drawn)
    data = ndimage.map_coordinates(source, coordinates, order=1, mode="nearest", prefilter=False)
    face = _face(coordinates, template.voxel_to_world, options.deface_line_yz_mm) if options.deface else None
    del coordinates, source

    # smooth multiplicative bias, then Rician noise
    if options.bias_std > 0:
        g = options.bias_grid
        log_bias = (rng.standard_normal((g, g, g)) * options.bias_std).astype(np.float32)
        subject_to_bias = np.eye(4)
        subject_to_bias[:3, :3] = np.diag([(g - 1) / max(n - 1, 1) for n in shape])
        data *= np.exp(resample_axis_aligned(log_bias, subject_to_bias, shape))
    noise_fraction = drawn["noise_fraction"]
    if noise_fraction > 0:
        sigma = noise_fraction * float(np.percentile(data[::4, ::4, ::4], 99))
        real = data + sigma * rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
        data = np.sqrt(real * real + imaginary * imaginary)
    if face is not None:
        data[face] = 0.0
    parameters = {"modality": label, **drawn, **fov, **({"defaced": True} if options.deface else {})}
    landmarks = {name: geometry.landmarks_mm[k] for k, name in enumerate(names)}
    return Subject(data.astype(np.float32, copy=False), subject_affine, landmarks, parameters)


def _face(template_voxel: np.ndarray, template_voxel_to_world: np.ndarray,
          line_yz_mm: tuple[tuple[float, float], tuple[float, float]]) -> np.ndarray:
    """Boolean mask ``[X, Y, Z]`` of the subject voxels whose template position (template voxels ``[3, X, Y, Z]``)
    lies below the line through the two ``(y, z)`` world points ``line_yz_mm`` (the face, for
    :data:`DEFACE_LINE_YZ_MM` and the MNI template)."""
    y = sum(template_voxel_to_world[1, a] * template_voxel[a] for a in range(3)) + template_voxel_to_world[1, 3]
    z = sum(template_voxel_to_world[2, a] * template_voxel[a] for a in range(3)) + template_voxel_to_world[2, 3]
    (y0, z0), (y1, z1) = line_yz_mm
    return z < z0 + (z1 - z0) / (y1 - y0) * (y - y0)


# ---------------------------------------------------------------------------------------------------------
# the population on disk

_WORKER: dict = {}


def _init_worker(template: Template, options: SynthOptions, out_dir: Path, seed: int) -> None:
    _WORKER.update(template=template, options=options, out_dir=out_dir, seed=seed)


def subject_id(index: int) -> str:
    return f"synth-{index:04d}"


def _write_subject(index: int) -> dict:
    template, options, out_dir, seed = (_WORKER[k] for k in ("template", "options", "out_dir", "seed"))
    started = time.perf_counter()
    rng = np.random.default_rng([seed, index])  # one stream per subject: any order, any number of workers
    subject = make_subject(template, options, rng)
    name = subject_id(index)
    image_path = Path("images") / f"{name}_{subject.parameters['modality']}{options.image_suffix}"
    landmark_path = Path("landmarks") / f"{name}.{options.landmark_format}"
    write_volume(out_dir / image_path, subject.data, subject.voxel_to_world, dtype="int16", rescale=True)
    write_landmarks(out_dir / landmark_path, subject.landmarks_world_mm, fmt=options.landmark_format)
    return {
        **subject.parameters,
        "subject": name,
        "image": image_path.as_posix(),
        "landmarks": landmark_path.as_posix(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def synthesize_population(
    template: Template,
    n: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    options: SynthOptions | None = None,
    workers: int = 1,
    progress: bool = True,
    on_subject: Callable[[dict], None] | None = None,
) -> Path:
    """Write ``n`` subjects to ``out_dir`` (``images/``, ``landmarks/``), then ``manifest.csv``
    (``subject,image,landmarks,split``, paths relative to it, split empty) and ``synth.json`` (options and
    what was drawn per subject). Reproducible for a given ``seed``, whatever ``workers``. Returns the manifest.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    options = options or SynthOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    bar = tqdm(total=n, desc="synthesizing subjects", unit="subject", disable=not progress)
    if workers <= 1:
        _init_worker(template, options, out_dir, seed)
        results = map(_write_subject, range(n))
        executor = None
    else:
        # fork: the workers share the template's memory and need no re-import
        executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker,
            initargs=(template, options, out_dir, seed),
        )
        results = executor.map(_write_subject, range(n))
    try:
        for row in results:
            rows.append(row)
            bar.update(1)
            if on_subject is not None:
                on_subject(row)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    description = {
        "created_by": "mdgru-localize synth",
        "seed": seed,
        "n": n,
        "template": {"images": template.sources, "landmarks": list(template.landmarks_world_mm)},
        "options": asdict(options),
        "subjects": rows,
    }
    write_text_atomic(out_dir / DESCRIPTION_NAME, json.dumps(description, indent=2) + "\n")
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["subject", "image", "landmarks", "split"])
    for row in rows:
        writer.writerow([row["subject"], row["image"], row["landmarks"], ""])
    return write_text_atomic(out_dir / MANIFEST_NAME, manifest.getvalue())


def moved_copy(
    image: str | Path,
    landmarks_world_mm: np.ndarray,
    out: str | Path,
    rotation_deg: tuple[float, float, float] = (8.0, -6.0, 10.0),
    shift_mm: tuple[float, float, float] = (6.0, -9.0, 5.0),
    spacing_mm: float = 1.2,
) -> np.ndarray:
    """Write ``image`` rotated about its centre (x, y, z Euler angles), shifted and resampled to isotropic
    ``spacing_mm`` voxels (trilinear) to ``out``; return ``landmarks_world_mm`` ``[K, 3]`` moved the same way.

    A plain rigid move with none of the synthetic population's deformations or appearance changes: how the
    shipped model's test and ``bench/bench_pretrained.py`` present the template itself as a new scan.
    """
    import nibabel as nib
    from scipy.spatial.transform import Rotation

    source = nib.as_closest_canonical(nib.load(str(image)))
    data = np.asarray(source.dataobj, dtype=np.float32)
    centre = source.affine[:3, :3] @ ((np.array(data.shape) - 1) / 2) + source.affine[:3, 3]
    rotation = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    forward = np.eye(4)  # template world -> new world
    forward[:3, :3] = rotation
    forward[:3, 3] = centre + np.asarray(shift_mm) - rotation @ centre
    shape = np.ceil(np.array(data.shape) / spacing_mm).astype(int)
    target = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    target[:3, 3] = centre + np.asarray(shift_mm) - spacing_mm * (shape - 1) / 2
    pull = np.linalg.inv(source.affine) @ np.linalg.inv(forward) @ target  # new voxel -> template voxel
    moved = ndimage.affine_transform(data, pull[:3, :3], pull[:3, 3], output_shape=tuple(shape), order=1)
    write_volume(out, moved.astype(np.float32), target)
    return affine_maps.voxel_to_world(np.asarray(landmarks_world_mm, dtype=np.float64), forward)
