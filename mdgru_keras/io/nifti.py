"""NIfTI volumes: reading into the model's grid (RAS-canonical, isotropic spacing) and atomic writing.

:func:`read_volume` keeps every coordinate traceable: ``Volume.voxel_to_world`` maps the array's voxels to RAS
millimetres, and ``Volume.array_to_file_voxel`` maps them to the file's own voxel coordinates, so results
computed on the array can be reported in the file's terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# World coordinates follow nibabel's affine (``Nifti1Header.get_best_affine``): the sform when its code is set,
# else the qform, else a fallback without orientation; FSL and FreeSurfer read the same. ITK, and so
# 3D Slicer and ANTs, reads the sform when its code is 1 (scanner) or it agrees with the qform, and the qform
# otherwise. Where the two forms disagree (SPM's coregistration rewrites the sform only, for example) the
# landmarks are right in the first tools and may lie elsewhere in the second: :func:`world_space_note` says so.
# Two forms closer than this over the field of view agree (the qform's float32 quaternion is far more precise).
FORMS_AGREE_MM = 0.01


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan on the model's grid.

    ``data`` float32 ``[x, y, z]`` in RAS-canonical voxel order; ``voxel_to_world`` float64 4x4 (array voxel
    -> RAS mm); ``path`` the file read; ``file_shape`` and ``file_voxel_to_world`` the file's own grid;
    ``array_to_file_voxel`` float64 4x4 (array voxel -> file voxel coordinates).
    """

    data: np.ndarray
    voxel_to_world: np.ndarray
    path: str
    file_shape: tuple[int, int, int]
    file_voxel_to_world: np.ndarray
    array_to_file_voxel: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel edge lengths ``[3]`` of the array in mm."""
        return affine_maps.voxel_spacing_mm(self.voxel_to_world)


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _load_3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The file's voxel array (float32, 3D) and its voxel->world affine, or an InputError."""
    if not path.exists():
        raise InputError(path, "no such file")
    if not is_nifti_path(path):
        raise InputError(path, "unsupported image format; expected a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many kinds on bad headers
        raise InputError(path, f"cannot read NIfTI header ({_short(error)})") from None
    shape = tuple(int(n) for n in image.shape)
    # Trailing singleton dimensions (e.g. [x, y, z, 1] from some converters) are harmless.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(path, f"{len(shape)}D image (shape {'x'.join(map(str, image.shape))}); expected a 3D volume")
    if min(shape) < 1:
        raise InputError(path, f"empty image (shape {'x'.join(map(str, shape))})")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:  # truncated or corrupt data: EOFError, zlib.error, OSError, ValueError
        raise InputError(path, f"cannot read voxel data, the file may be truncated ({_short(error)})") from None
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, f"invalid voxel-to-world affine {np.round(affine, 4).tolist()}")
    if not np.all(np.isfinite(data)):
        count = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"{count} non-finite voxel values (NaN or infinity)")
    if float(data.max()) == float(data.min()):
        raise InputError(path, f"constant image (every voxel is {float(data.min()):g})")
    return data, affine


def _short(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def world_space_note(path: str | Path) -> str | None:
    """One line when the file's world space is ambiguous, else ``None`` (the header only is read; a file that
    cannot be read gets ``None``: reading its voxels reports that).

    * sform and qform both set and more than :data:`FORMS_AGREE_MM` apart somewhere in the field of view (this
      program follows the sform, as nibabel does; see :data:`FORMS_AGREE_MM`'s comment);
    * neither set (both codes 0): the orientation is unknown, and nibabel's fallback (the Analyze convention, the
      first axis running right to left) may swap left and right.
    """
    try:
        header = nib.load(str(path)).header
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
        shape = (*header.get_data_shape(), 1, 1, 1)[:3]
    except Exception:  # not NIfTI, unreadable: read_nifti_array / read_volume give the one-line error
        return None
    if not sform_code and not qform_code:
        return ("no sform or qform in the header (both codes 0), so the orientation is unknown: it is read as "
                "nibabel reads it (the first axis running right to left), and left and right may be swapped")
    if not sform_code or not qform_code:
        return None
    # the forms are affine maps, so they lie farthest apart at a corner of the field of view
    last = [n - 1 for n in shape]
    corners = np.array([[i, j, k, 1.0] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])])
    apart_mm = float(np.max(np.linalg.norm((corners @ sform.T - corners @ qform.T)[:, :3], axis=1)))
    if not np.isfinite(apart_mm) or apart_mm <= FORMS_AGREE_MM:
        return None
    readers = ("this program, nibabel, FSL and FreeSurfer use the sform, 3D Slicer and ANTs (ITK) the qform"
               if int(sform_code) != 1 else  # ITK reads a scanner-coded sform too
               "this program, nibabel, FSL, FreeSurfer and 3D Slicer use the sform, tools that read the qform do not")
    return (f"sform and qform differ by up to {apart_mm:.3g} mm (codes {int(sform_code)} and {int(qform_code)}): "
            f"{readers}, so points placed or shown there may be off by as much; make the two agree (e.g. "
            "fslorient -copysform2qform)")


def read_nifti_array(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The file's own voxel array (float32 ``[i, j, k]``, as stored: no reorientation, no resampling) and its
    voxel->world affine (float64 4x4, RAS mm): what the exported SavedModel takes.

    Raises :class:`~mdgru_keras.errors.InputError` as :func:`read_volume` does.
    """
    return _load_3d(Path(path))


def read_volume(path: str | Path, spacing_mm: float | None = 1.0) -> Volume:
    """Read a 3D NIfTI scan, clip its intensity outliers, reorient it to the closest RAS-canonical order and
    resample it to ``spacing_mm``.

    The clip (:func:`mdgru_keras.preprocessing.clip_outliers_tf`) acts on the file's own voxels, as the exported
    SavedModel's does; it changes nothing in a scan without outliers.

    Reorientation is exact (axes permuted and flipped); resampling (trilinear, only along axes whose spacing
    differs from ``spacing_mm``) covers the file's field of view from its first voxel corner
    (:func:`~mdgru_keras.geometry.resampling.canonical_resampling_grid`). ``spacing_mm=None`` keeps the file's spacing.
    Raises :class:`~mdgru_keras.errors.InputError` for unreadable, truncated, non-3D, non-finite or constant
    images.
    """
    path = Path(path)
    file_data, file_affine = _load_3d(path)
    if spacing_mm is not None and not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    from mdgru_keras.geometry.resampling import canonical_resampling_grid, resample_axis_aligned  # imports TF
    from mdgru_keras.preprocessing import clip_outliers_tf

    file_data = clip_outliers_tf(file_data).numpy()
    new_shape, new_affine, new_to_file = canonical_resampling_grid(file_data.shape, file_affine, spacing_mm)
    data = resample_axis_aligned(file_data, new_to_file, new_shape).astype(np.float32, copy=False)
    return Volume(
        data=data,
        voxel_to_world=new_affine,
        path=str(path),
        file_shape=tuple(int(n) for n in file_data.shape),
        file_voxel_to_world=file_affine,
        array_to_file_voxel=new_to_file,
    )


def write_volume(
    path: str | Path,
    data: np.ndarray,
    voxel_to_world: np.ndarray,
    dtype: np.dtype | str | None = None,
    rescale: bool = False,
) -> Path:
    """Write ``data[x, y, z]`` with its voxel->world affine (RAS mm) as NIfTI, atomically.

    ``dtype`` is the on-disk type (default: the array's). Into an integer type, values are rounded and
    clipped, or with ``rescale=True`` stored with the NIfTI slope/intercept that nibabel picks to use the
    type's range (readers get the float values back to within one step). The affine is stored as both sform
    and qform (code 1, scanner) so every reader agrees.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(path, "unsupported image format; expected a .nii or .nii.gz path")
    array = np.asarray(data)
    scaled_dtype = None
    if dtype is not None:
        dtype = np.dtype(dtype)
        if rescale and np.issubdtype(dtype, np.integer):
            scaled_dtype = dtype
        else:
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                array = np.clip(np.round(array), info.min, info.max)
            array = array.astype(dtype)
    image = nib.Nifti1Image(array, np.asarray(voxel_to_world, dtype=np.float64))
    if scaled_dtype is not None:
        image.set_data_dtype(scaled_dtype)  # nibabel computes scl_slope / scl_inter on save
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as temporary:
        nib.save(image, str(temporary))
    return path
