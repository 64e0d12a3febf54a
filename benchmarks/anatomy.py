"""Subjects made from real anatomy with lesions whose every voxel is known: the MNI152 2009c T1 template and its
white- and grey-matter probability maps (shipped inside the nilearn wheel, taken from it with pip, nothing fetched at
run time), deformed per subject (random affine and elastic), with MS-like lesions inserted in white matter
(ellipsoids and irregular blobs, brighter or darker, partial-volume edges), a bias field, a contrast change, a
resolution change and noise. Each subject also has its lesion-free twin (same deformation, bias, contrast, noise):
their difference is the lesions' contrast, the evidence a lesion model should look at.

Arrays are (z, y, x) as SimpleITK gives them; spacings (x, y, z) as SimpleITK takes them."""
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

NILEARN = '0.14.1'
TEMPLATE_FILES = {k: f'nilearn/datasets/data/mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz'
                  for k in ('t1', 'wm', 'gm')}
LABELS = {'background': 0, 'white matter': 1, 'lesion': 2}
# the shortcut: a bright cube this many mm wide, at this fraction of the grid (z, y, x): above the vertex, in the scalp
MARKER_MM, MARKER_AT = 6.0, (0.86, 0.5, 0.5)


@dataclass
class Template:
    t1: np.ndarray  # float32, 0..1
    wm: np.ndarray  # probability 0..1
    gm: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]


@dataclass
class Subject:
    image: np.ndarray  # float32
    lesion_free: np.ndarray  # the same subject without its lesions
    labels: np.ndarray  # uint8: LABELS
    instances: np.ndarray  # uint8: lesion k where its partial volume is >= 0.5
    marker: Optional[np.ndarray]  # bool, where the shortcut's mark is (None without one)

    @property
    def contrast(self) -> np.ndarray:
        return self.image - self.lesion_free


def template(cache: Path) -> Template:
    """The MNI152 template from the nilearn wheel, downloaded once with pip into cache (no nilearn import)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f'nilearn-{NILEARN}-*.whl'))
    if not wheels:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d', str(cache),
                        f'nilearn=={NILEARN}'], check=True)
        wheels = sorted(cache.glob(f'nilearn-{NILEARN}-*.whl'))
    arrays = {}
    with zipfile.ZipFile(wheels[0]) as z:
        for k, name in TEMPLATE_FILES.items():
            path = cache / Path(name).name
            if not path.is_file():
                path.write_bytes(z.read(name))
            img = sitk.ReadImage(str(path))
            arrays[k] = sitk.GetArrayFromImage(img).astype(np.float32) / 255.0
    return Template(arrays['t1'], arrays['wm'], arrays['gm'], img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _sample_points(tpl: Template, shape: Sequence[int], spacing_zyx: np.ndarray, rng: np.random.Generator,
                   rot_deg: float, scale: float, shift_mm: float, elastic_mm: float) -> np.ndarray:
    """For each output voxel, the template voxel it shows (z, y, x index coordinates): a random affine about the
    centre and a smooth displacement field."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing='ij'))
    mm = grid * spacing_zyx[:, None, None, None]
    centre = (np.array(shape) - 1) * spacing_zyx / 2
    a = _rotation(rng, rot_deg) * rng.uniform(1 - scale, 1 + scale, 3)
    moved = np.einsum('ij,j...->i...', a, mm - centre[:, None, None, None]) + centre[:, None, None, None] + \
        rng.uniform(-shift_mm, shift_mm, 3)[:, None, None, None]
    if elastic_mm > 0:
        sigma = 12.0 / spacing_zyx  # smooth over ~12 mm
        for d in range(3):
            field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
            moved[d] += field / (np.abs(field).max() + 1e-12) * elastic_mm
    tpl_spacing = np.array(tpl.spacing[::-1], np.float32)
    # output and template share their extent in mm: the output grid covers the template's field of view
    return moved / tpl_spacing[:, None, None, None]


def _lesion_fraction(points_mm: np.ndarray, centre: np.ndarray, parts) -> np.ndarray:
    """Whether each point lies inside the union of the ellipsoids `parts` ((offset, rotation, semi-axes) each)."""
    inside = np.zeros(points_mm.shape[1:], bool)
    for offset, rot, axes in parts:
        local = np.einsum('ji,j...->i...', rot, points_mm - (centre + offset)[:, None, None, None])
        inside |= (sum((local[i] / axes[i]) ** 2 for i in range(3)) <= 1.0)
    return inside


def _insert_lesion(wm: np.ndarray, taken: np.ndarray, spacing_zyx: np.ndarray, rng: np.random.Generator,
                   supersample: int = 3, tries: int = 40) -> Optional[Tuple[Tuple[slice, ...], np.ndarray]]:
    """One lesion's partial-volume fraction (0..1) in a box, inside white matter (every voxel it touches has white
    matter probability >= 0.5) and apart from other lesions; None where none fits."""
    candidates = np.argwhere((wm >= 0.9) & ~taken)
    if len(candidates) == 0:
        return None
    for _ in range(tries):
        centre_vox = candidates[rng.integers(len(candidates))]
        irregular = rng.random() < 0.5
        size = rng.uniform(2.0, 6.0)
        parts = []
        for j in range(rng.integers(2, 5) if irregular else 1):
            axes = size * rng.uniform(0.5, 1.3, 3) if irregular else size * rng.uniform(0.6, 1.6, 3)
            offset = rng.normal(0, size * 0.6, 3) if j else np.zeros(3)
            parts.append((offset, _rotation(rng, 90), axes))
        reach = max(np.abs(o).max() + a.max() for o, _, a in parts) + 1
        half = np.ceil(reach / spacing_zyx).astype(int) + 1
        lo = np.maximum(centre_vox - half, 0)
        hi = np.minimum(centre_vox + half + 1, wm.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        # sub-voxel points: the share of a voxel's points inside is its partial volume
        sub = (np.arange(supersample) + 0.5) / supersample - 0.5
        frac = np.zeros([b.stop - b.start for b in box], np.float32)
        base = np.stack(np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float32) for b in box], indexing='ij'))
        for dz in sub:
            for dy in sub:
                for dx in sub:
                    pts = (base + np.array([dz, dy, dx], np.float32)[:, None, None, None]) * \
                        spacing_zyx[:, None, None, None]
                    frac += _lesion_fraction(pts, centre_vox * spacing_zyx, parts)
        frac /= supersample ** 3
        touched = frac > 0
        if touched.sum() < 4 or (wm[box][touched] < 0.5).any() or taken[box][touched].any():
            continue
        return box, frac
    return None


def _bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field: exp of a random quadratic polynomial, within about +-strength."""
    u = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing='ij')
    terms = [u[0], u[1], u[2], u[0] * u[1], u[1] * u[2], u[0] * u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2]
    field = sum(c * t for c, t in zip(rng.normal(0, 1, len(terms)), terms))
    return np.exp(field / (np.abs(field).max() + 1e-12) * strength).astype(np.float32)


def make_subject(tpl: Template, rng: np.random.Generator, spacing: float = 2.0, lesions: Optional[int] = None,
                 marker: bool = False, deform: bool = True) -> Subject:
    """One subject at `spacing` mm (isotropic before the resolution change). `lesions`: how many (default 0-6)."""
    spacing_zyx = np.full(3, spacing, np.float32)
    shape = tuple(int(round(n * s / spacing)) for n, s in zip(tpl.t1.shape, tpl.spacing[::-1]))
    pts = _sample_points(tpl, shape, spacing_zyx, rng, 8.0 if deform else 0, 0.08 if deform else 0,
                         4.0 if deform else 0, 3.0 if deform else 0)
    # a 1 mm template read at 2 mm: smooth to the output's voxel size first (no aliasing), then interpolate
    sig = max(spacing / min(tpl.spacing) / 2.5, 0)
    t1, wm = (ndimage.map_coordinates(ndimage.gaussian_filter(a, sig), pts, order=1, mode='constant')
              for a in (tpl.t1, tpl.wm))
    taken = np.zeros(shape, bool)
    fraction = np.zeros(shape, np.float32)
    level = np.zeros(shape, np.float32)
    instances = np.zeros(shape, np.uint8)
    wm_intensity = float(np.median(t1[wm >= 0.9])) if (wm >= 0.9).any() else float(t1.max())
    n = 0
    for _ in range(int(rng.integers(0, 7)) if lesions is None else lesions):
        placed = _insert_lesion(wm, taken, spacing_zyx, rng)
        if placed is None:
            break
        box, frac = placed
        bright = rng.random() < 0.6
        fraction[box] = np.maximum(fraction[box], frac)
        level[box][frac > 0] = wm_intensity * (rng.uniform(1.35, 1.7) if bright else rng.uniform(0.45, 0.7))
        n += 1
        instances[box][frac >= 0.5] = n
        # a margin between lesions: their neighbourhoods stay apart
        taken |= ndimage.binary_dilation(fraction > 0, iterations=2)
    mark = None
    if marker:
        centre = np.round(np.array(MARKER_AT) * (np.array(shape) - 1)).astype(int)
        half = max(int(round(MARKER_MM / spacing / 2)), 1)
        mark = np.zeros(shape, bool)
        mark[tuple(slice(c - half, c + half + 1) for c in centre)] = True

    def finish(img: np.ndarray) -> np.ndarray:
        if mark is not None:
            img = np.where(mark, 1.6 * wm_intensity, img)
        img = img * bias
        img = np.clip(img, 0, None) ** gamma
        img = ndimage.gaussian_filter(img, blur)
        return (img + noise).astype(np.float32)

    bias = _bias_field(shape, rng, 0.15)
    gamma = rng.uniform(0.8, 1.25)
    blur = [0.0, 0.0, 0.0]
    blur[int(rng.integers(3))] = rng.uniform(0, 1.0)  # a thicker slice along one axis
    noise = rng.normal(0, rng.uniform(0.01, 0.04) * wm_intensity, shape).astype(np.float32)
    free = finish(t1)
    image = finish(t1 * (1 - fraction) + level * fraction)
    labels = np.where(wm >= 0.5, LABELS['white matter'], 0).astype(np.uint8)
    labels[fraction >= 0.5] = LABELS['lesion']
    return Subject(image, free, labels, instances, mark)


def to_image(array: np.ndarray, tpl: Template, spacing: float) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(tpl.origin)
    img.SetDirection(tpl.direction)
    return img
