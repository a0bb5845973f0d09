"""Deformable atlas-registration baseline: carry a labelled template's landmarks to a scan with ANTsPy (SyN).

What users run today to put template landmarks into a subject (fMRIPrep's spatial normalisation, the AFIDs
tools' template registration): ANTs' ``antsRegistration`` with an affine stage and then symmetric
normalization (SyN), Mattes mutual information throughout (so a T1w template also fits T2w scans). Here it
is ANTsPy's own ``ants.registration(fixed, moving, type_of_transform="SyN")`` preset, unchanged:

* initial transform: the images' centres of mass (``[fixed, moving, 1]``);
* affine: Mattes MI (32 bins, regular sampling of 20 % of the voxels), shrink factors 4/2/2/1 with smoothing
  sigmas 3/2/1/0 voxels, at most 2100/1200/1200/0 iterations;
* SyN (gradient step 0.2, flow sigma 3 voxels, total sigma 0): dense Mattes MI (32 bins), shrink factors 4/2/1
  with sigmas 2/1/0 voxels, 40/20/0 iterations (the full-resolution level is skipped, as in ANTsPy's preset).

``transform="Affine"`` runs ANTsPy's ``"Affine"`` preset instead (no deformation).

Direction: the template is ANTs' *fixed* image and the scan the *moving* one. ANTs' forward transforms
(``fwdtransforms``: the SyN warp, then the affine) resample the moving scan onto the template's grid, so, as a
*point* map, they take template points to scan points (``ants.apply_transforms_to_points``: "point mapping goes
the opposite direction of image mapping"). The template's landmarks therefore go through ``fwdtransforms``
as they are, with no matrix inverted and no inverse warp: the forward warp field lives on the template grid,
where the landmarks are.

Conventions: our arrays are ``[x, y, z]`` with RAS ``voxel_to_world`` affines; ANTs, like ITK, works in LPS and
its NumPy arrays are in ITK index order ``[i, j, k]`` (not transposed, unlike SimpleITK's). RAS <-> LPS only
through :mod:`mdgru_keras.geometry.affine_maps`, in :func:`to_ants_image` and :func:`register_landmarks`.

ANTsPy is an optional dependency (``pip install 'mdgru-keras[ants]'``); :func:`import_ants` says so in one line.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from mdgru_keras.geometry import affine_maps

ANTS_TRANSFORMS = ("SyN", "Affine")  # ANTsPy presets: affine then SyN (default), or affine only
INSTALL_HINT = "pip install 'mdgru-keras[ants]'"


def import_ants() -> Any:
    """The ``ants`` module (ANTsPy); ``ImportError`` with the install command if it is missing."""
    try:
        import ants
    except ImportError as error:
        raise ImportError(f"the ANTs baseline needs ANTsPy (antspyx): {INSTALL_HINT} ({error})") from None
    return ants


@dataclass(frozen=True)
class AntsSettings:
    """Knobs of :func:`register_landmarks`; the defaults are ANTsPy's ``"SyN"`` preset as it ships."""

    transform: str = "SyN"  # "SyN": affine then SyN; "Affine": affine only (ANTsPy's "Affine" preset)
    syn_iterations: tuple[int, ...] = (40, 20, 0)  # per SyN level, coarse to fine (shrink 2**(levels-1) ... 1)
    gradient_step: float = 0.2  # SyN gradient step
    flow_sigma_voxel: float = 3.0  # SyN: Gaussian smoothing of the update field
    total_sigma_voxel: float = 0.0  # SyN: Gaussian smoothing of the total field

    def __post_init__(self) -> None:
        if self.transform not in ANTS_TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(ANTS_TRANSFORMS)}; received {self.transform!r}")
        if not self.syn_iterations or any(n < 0 for n in self.syn_iterations):
            raise ValueError(f"syn_iterations must be >= 0, one per level; received {self.syn_iterations}")

    @property
    def name(self) -> str:
        """Row name in the evaluation table: ``ants-syn`` or ``ants-affine``."""
        return f"ants-{self.transform.lower()}"


def to_ants_image(volume: np.ndarray, voxel_to_world: np.ndarray) -> Any:
    """A float32 ANTs image of ``volume[x, y, z]`` with RAS affine ``voxel_to_world`` (origin, direction in LPS)."""
    ants = import_ants()
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume [x, y, z], got shape {volume.shape}")
    origin_lps, spacing_mm, direction_lps = affine_maps.itk_geometry_from_affine(voxel_to_world)
    return ants.from_numpy(
        np.ascontiguousarray(volume, dtype=np.float32),
        origin=tuple(float(v) for v in origin_lps),
        spacing=tuple(float(v) for v in spacing_mm),
        direction=np.asarray(direction_lps, dtype=np.float64),
    )


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the ANTs call, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def register(template: Any, target: Any, settings: AntsSettings, seed: int, work_dir: str) -> list[str]:
    """Run ANTs with the template fixed and the scan moving; the forward transform files (in ``work_dir``),
    which map template (LPS) points to scan (LPS) points with ``ants.apply_transforms_to_points``."""
    ants = import_ants()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # antsRegistration reads ANTS_RANDOM_SEED when no --random-seed is given; 0 would mean "no seed", so +1.
    # (Threads: ITK reads ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS once per process, before the first ITK call.)
    with _environment(ANTS_RANDOM_SEED=str(seed + 1)):
        result = ants.registration(
            fixed=template,
            moving=target,
            type_of_transform=settings.transform,
            outprefix=os.path.join(work_dir, "template_to_scan_"),
            reg_iterations=tuple(settings.syn_iterations),
            grad_step=settings.gradient_step,
            flow_sigma=settings.flow_sigma_voxel,
            total_sigma=settings.total_sigma_voxel,
        )
    return list(result["fwdtransforms"])


def register_landmarks(
    template_volume: np.ndarray,
    template_voxel_to_world: np.ndarray,
    template_landmarks_world_mm: dict[str, np.ndarray],
    target_volume: np.ndarray,
    target_voxel_to_world: np.ndarray,
    seed: int = 0,
    settings: AntsSettings | None = None,
) -> dict[str, np.ndarray]:
    """Landmarks of a template carried to a target scan by ANTs affine + SyN registration.

    Arguments and result as :func:`mdgru_keras.baselines.registration.register_landmarks`: RAS mm in, RAS mm
    out (``(3,)`` float64 per landmark, in the template's order). ``seed`` (>= 0) seeds ANTs' random metric
    sampling; with several threads, repeated runs still differ by round-off (the order of ITK's sums).
    """
    ants = import_ants()
    import pandas as pd  # an ANTsPy dependency: its point functions take data frames

    settings = settings or AntsSettings()
    names = list(template_landmarks_world_mm)
    if not names:
        return {}
    template = to_ants_image(template_volume, template_voxel_to_world)
    target = to_ants_image(target_volume, target_voxel_to_world)
    world_mm = np.stack([np.asarray(template_landmarks_world_mm[n], dtype=np.float64) for n in names])
    points_lps = affine_maps.ras_to_lps(world_mm)
    with tempfile.TemporaryDirectory(prefix="mdgru-ants-") as work_dir:
        transforms = register(template, target, settings, seed, work_dir)
        moved = ants.apply_transforms_to_points(
            3,
            pd.DataFrame(points_lps, columns=["x", "y", "z"]),
            transforms,
            whichtoinvert=[False] * len(transforms),
        )
        mapped_lps = moved[["x", "y", "z"]].to_numpy(dtype=np.float64)
    mapped = affine_maps.lps_to_ras(mapped_lps)
    return {name: mapped[i] for i, name in enumerate(names)}
