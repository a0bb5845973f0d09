"""A synthetic, labelled population made from one template scan with landmarks.

Each subject is the template under a random smooth elastic deformation and a random rigid pose, seen
through a random field of view (centred on the head, or lower, reaching the neck), optionally with
anisotropic voxels, and with a smooth multiplicative bias field and Rician noise. The landmarks go through
the same transform exactly.

How the transform is built (coordinate math in :mod:`mdgru_keras.geometry`):

* The image is resampled through the *pull-back* map from subject world to template world,
  ``template_mm = rigid^-1(subject_mm + u(subject_mm))``, where ``u`` is a displacement field on a coarse
  control grid (``elastic_grid_mm``) fixed in subject world, interpolated trilinearly.
* The landmarks take the *forward* map: ``z = rigid(template_mm)``, then ``y + u(y) = z`` is solved for
  ``y`` by fixed-point iteration (:func:`~mdgru_keras.geometry.invert_displacement`), with the very same
  trilinear ``u`` the image sees, so they agree to 1e-6 mm.
* Speed: the pull-back is affine plus ``u``, and trilinear interpolation reproduces affine maps exactly, so
  the template-voxel coordinates are computed on the control grid only and upsampled separably to the
  subject grid (:func:`~mdgru_keras.geometry.resample_axis_aligned`); one ``map_coordinates`` (order 1)
  samples the template.

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

from mdgru_keras import geometry
from mdgru_keras.errors import InputError
from mdgru_keras.io.atomic import write_text_atomic
from mdgru_keras.io.landmarks import check_landmarks_inside, read_landmarks, write_landmarks
from mdgru_keras.io.nifti import read_volume, write_volume

MANIFEST_NAME = "manifest.csv"
DESCRIPTION_NAME = "synth.json"


@dataclass(frozen=True)
class SynthOptions:
    """Random ranges of the synthetic population (defaults suit a 1 mm head template such as MNI 2009c)."""

    max_rotation_deg: float = 15.0  # each Euler angle uniform in [-a, a]
    max_translation_mm: float = 20.0  # each axis uniform in [-t, t]
    elastic_mm: float = 3.0  # standard deviation of each displacement component
    elastic_smoothness_mm: float = 20.0  # Gaussian correlation length of the displacement field
    elastic_grid_mm: float = 8.0  # control-grid spacing of the displacement field
    neck_probability: float = 0.3  # field of view lowered (and taller), reaching the neck
    spacing_mm: float = 1.0  # voxel size (in plane, for anisotropic subjects)
    anisotropic_probability: float = 0.0  # one axis gets thick slices
    slice_thickness_mm: tuple[float, float] = (1.5, 3.0)  # uniform range of that axis' spacing
    bias_std: float = 0.15  # log bias field: std at the nodes of a bias_grid^3 lattice over the field of view
    bias_grid: int = 4
    max_noise: float = 0.03  # Rician noise sigma, uniform in [0, max_noise] x the 99th intensity percentile
    image2_probability: float = 0.5  # chance of a subject from the second image (when one is given)
    landmark_margin_mm: float = 10.0  # every landmark at least this far inside the field of view
    image_suffix: str = ".nii"  # or ".nii.gz": noisy images shrink by only ~12 % and gzip triples the time
    landmark_format: str = "fcsv"  # or "mrk.json", "csv"

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_rotation_deg", "max_translation_mm", "elastic_mm", "bias_std", "max_noise"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0")
        for name in ("elastic_smoothness_mm", "elastic_grid_mm", "spacing_mm"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        for name in ("neck_probability", "anisotropic_probability", "image2_probability"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        low, high = self.slice_thickness_mm
        if not 0 < low <= high:
            problems.append("slice_thickness_mm must be (low, high) with 0 < low <= high")
        if self.bias_grid < 2:
            problems.append("bias_grid must be >= 2")
        if self.image_suffix not in (".nii.gz", ".nii"):
            problems.append("image_suffix must be .nii.gz or .nii")
        if self.landmark_format not in ("fcsv", "mrk.json", "csv"):
            problems.append("landmark_format must be fcsv, mrk.json or csv")
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
        world = geometry.voxel_to_world(corners, self.voxel_to_world)
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
# one subject


def _control_grid(template: Template, options: SynthOptions) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Origin (world mm) and shape of the displacement control grid: the template's box grown on every side
    by half its extent plus the largest translation, so that every field of view lies inside it."""
    low, high = template.world_bounds_mm()
    margin = 0.5 * (high - low) + options.max_translation_mm + options.landmark_margin_mm
    origin = low - margin
    shape = tuple(int(np.ceil((high - low + 2 * margin)[a] / options.elastic_grid_mm)) + 1 for a in range(3))
    return origin, shape


def _displacement_field(shape: tuple[int, int, int], options: SynthOptions, rng: np.random.Generator) -> np.ndarray:
    """Smooth random displacement ``[L1, L2, L3, 3]`` (mm) on the control grid, each component with std
    ``elastic_mm``."""
    if options.elastic_mm == 0:
        return np.zeros((*shape, 3), np.float64)
    sigma_nodes = options.elastic_smoothness_mm / options.elastic_grid_mm
    field = np.empty((*shape, 3), np.float64)
    for component in range(3):
        smooth = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_nodes, mode="wrap")
        field[..., component] = smooth * (options.elastic_mm / max(smooth.std(), 1e-12))
    return field


def _field_of_view(
    template: Template,
    landmarks_mm: np.ndarray,
    grid_box: tuple[np.ndarray, np.ndarray],
    options: SynthOptions,
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray, dict]:
    """Spacing ``[3]``, shape and first-voxel-centre world position ``[3]`` of a random field of view."""
    low, high = template.world_bounds_mm()
    extent = high - low
    centre = 0.5 * (low + high) + rng.uniform(-0.05, 0.05, 3) * extent
    size_mm = extent * rng.uniform(0.9, 1.05, 3)
    neck = bool(rng.random() < options.neck_probability)
    if neck:
        size_mm[2] = extent[2] * rng.uniform(1.0, 1.25)
        centre[2] -= extent[2] * rng.uniform(0.1, 0.2)
    else:
        size_mm[2] = extent[2] * rng.uniform(0.85, 1.0)
    spacing = np.full(3, options.spacing_mm)
    thick_axis = None
    if rng.random() < options.anisotropic_probability:
        thick_axis = int(rng.integers(3))
        spacing[thick_axis] = rng.uniform(*options.slice_thickness_mm)
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
    described = {"neck": neck, "thick_axis": thick_axis, "spacing_mm": spacing.tolist(), "shape": shape.tolist()}
    return spacing, tuple(int(n) for n in shape), first_voxel_mm, described


def make_subject(template: Template, options: SynthOptions, rng: np.random.Generator) -> Subject:
    """Draw one subject (see the module docstring)."""
    labels = template.labels
    label = labels[1] if len(labels) > 1 and rng.random() < options.image2_probability else labels[0]
    # rigid pose (forward: template world -> subject world, rotation about the template centre)
    low, high = template.world_bounds_mm()
    angles_deg = rng.uniform(-options.max_rotation_deg, options.max_rotation_deg, 3)
    translation_mm = rng.uniform(-options.max_translation_mm, options.max_translation_mm, 3)
    rigid = geometry.rigid_affine(geometry.rotation_matrix_deg(angles_deg), translation_mm, 0.5 * (low + high))
    # elastic displacement u on a control grid fixed in subject world
    grid_origin, grid_shape = _control_grid(template, options)
    displacement = _displacement_field(grid_shape, options, rng)
    grid_step = options.elastic_grid_mm

    def displacement_at(subject_mm: np.ndarray) -> np.ndarray:
        return geometry.interpolate_at(displacement, (subject_mm - grid_origin) / grid_step)

    # landmarks: forward map, the displacement inverted at each point
    names = list(template.landmarks_world_mm)
    template_mm = np.stack([template.landmarks_world_mm[n] for n in names])
    subject_mm = geometry.invert_displacement(geometry.apply_affine(rigid, template_mm), displacement_at)

    grid_box = (grid_origin, grid_origin + (np.asarray(grid_shape) - 1) * grid_step)
    spacing, shape, first_voxel_mm, fov = _field_of_view(template, subject_mm, grid_box, options, rng)
    subject_affine = np.diag([*spacing, 1.0])
    subject_affine[:3, 3] = first_voxel_mm

    # pull-back on the control grid: template voxel of each control point, then upsampled to the subject grid
    node_mm = np.stack(
        np.meshgrid(*[grid_origin[a] + grid_step * np.arange(grid_shape[a]) for a in range(3)], indexing="ij"), -1
    )
    pull_back = np.linalg.inv(template.voxel_to_world) @ np.linalg.inv(rigid)
    node_template_voxel = geometry.apply_affine(pull_back, node_mm + displacement).astype(np.float32)
    subject_to_node = np.eye(4)
    subject_to_node[:3, :3] = np.diag(spacing / grid_step)
    subject_to_node[:3, 3] = (first_voxel_mm - grid_origin) / grid_step
    coordinates = np.stack(
        [geometry.resample_axis_aligned(node_template_voxel[..., a], subject_to_node, shape) for a in range(3)]
    )
    source = template.images[label]
    if fov["thick_axis"] is not None:
        source = _slice_profile(source, template.voxel_to_world, rigid, fov["thick_axis"], spacing)
    data = ndimage.map_coordinates(source, coordinates, order=1, mode="nearest", prefilter=False)
    del coordinates

    # smooth multiplicative bias, then Rician noise
    if options.bias_std > 0:
        g = options.bias_grid
        log_bias = (rng.standard_normal((g, g, g)) * options.bias_std).astype(np.float32)
        subject_to_bias = np.eye(4)
        subject_to_bias[:3, :3] = np.diag([(g - 1) / max(n - 1, 1) for n in shape])
        data *= np.exp(geometry.resample_axis_aligned(log_bias, subject_to_bias, shape))
    noise_fraction = float(rng.uniform(0, options.max_noise))
    if noise_fraction > 0:
        sigma = noise_fraction * float(np.percentile(data[::4, ::4, ::4], 99))
        real = data + sigma * rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
        data = np.sqrt(real * real + imaginary * imaginary)
    parameters = {
        "modality": label,
        "rotation_deg": angles_deg.tolist(),
        "translation_mm": translation_mm.tolist(),
        "noise_fraction": noise_fraction,
        **fov,
    }
    landmarks = {name: subject_mm[k] for k, name in enumerate(names)}
    return Subject(data.astype(np.float32, copy=False), subject_affine, landmarks, parameters)


def _slice_profile(
    volume: np.ndarray, voxel_to_world: np.ndarray, rigid: np.ndarray, thick_axis: int, spacing: np.ndarray
) -> np.ndarray:
    """The template blurred along the axis that the subject's thick slices cut (Gaussian, FWHM = thickness),
    so that thick slices average over their thickness instead of aliasing."""
    direction = np.linalg.inv(voxel_to_world[:3, :3]) @ np.linalg.inv(rigid[:3, :3])[:, thick_axis]
    axis = int(np.argmax(np.abs(direction)))
    template_spacing = geometry.voxel_spacing_mm(voxel_to_world)[axis]
    fwhm = np.sqrt(max(spacing[thick_axis] ** 2 - template_spacing**2, 0.0)) / template_spacing
    if fwhm <= 0:
        return volume
    return ndimage.gaussian_filter1d(volume, fwhm / 2.3548, axis=axis, mode="nearest")


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
