"""A request's region: a box or a ball drawn on the uploaded image's grid, written as a mask in its format."""
from pathlib import Path
from typing import List, Literal, Optional

import numpy as np
from pydantic import BaseModel, Field

from ..errors import UsageError


class Region(BaseModel):
    """Which voxels to explain. predicted/all: the whole case; mask: an uploaded case holding a mask; box/point:
    in voxel indices (i, j, k) of the uploaded image, or in RAS millimetres."""
    kind: Literal['predicted', 'all', 'mask', 'box', 'point'] = 'predicted'
    mask: Optional[str] = Field(None, max_length=64)
    box: Optional[List[List[float]]] = Field(None, description='[[lo...], [hi...]], both inclusive')
    point: Optional[List[float]] = None
    radius_mm: float = Field(10, gt=0)
    space: Literal['voxel', 'ras'] = 'voxel'


def region_array(region: Region, size, spacing: np.ndarray, corners: List[np.ndarray]) -> np.ndarray:
    """A box (two corners) or a ball (its centre) in continuous voxel indices (i, j, k) on an image of `size`, as
    uint8 in numpy's order (k, j, i). Drawn inside its bounding box alone: a full-size grid costs a CT half a second."""
    if region.kind == 'box':
        a, b = corners
        lo, hi = np.floor(np.minimum(a, b) + 0.5), np.floor(np.maximum(a, b) + 0.5)  # both inclusive
    else:
        reach = region.radius_mm / spacing
        lo, hi = np.floor(corners[0] - reach), np.ceil(corners[0] + reach)
    start = np.clip(lo, 0, size).astype(int)
    stop = np.clip(hi + 1, 0, size).astype(int)
    out = np.zeros(tuple(size)[::-1], np.uint8)
    if (stop <= start).any():
        return out
    block = tuple(slice(a, b) for a, b in zip(start, stop))
    if region.kind == 'box':
        inside = 1
    else:
        d2 = sum(((x - c) * sp) ** 2 for x, c, sp in zip(np.ogrid[block], corners[0], spacing))
        inside = (d2 <= region.radius_mm ** 2).transpose()
    out[block[::-1]] = inside
    return out


def draw_region(image_file: str, region: Region, path: Path) -> str:
    """A box or ball drawn on the grid of `image_file` (its header alone is read), written to `path`."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(image_file)
    reader.ReadImageInformation()  # the geometry alone: no voxels read
    size = np.array(reader.GetSize())
    img = sitk.Image([1] * len(size), sitk.sitkUInt8)  # the index <-> physical transform does not need the size
    img.SetOrigin(reader.GetOrigin())
    img.SetSpacing(reader.GetSpacing())
    img.SetDirection(reader.GetDirection())

    def index(p):
        p = [float(v) for v in p]
        if len(p) != img.GetDimension():
            raise UsageError(f'a {img.GetDimension()}D image needs {img.GetDimension()} coordinates, got {len(p)}')
        if region.space == 'voxel':
            return np.array(p)
        lps = [-p[0], -p[1], *p[2:]]  # RAS -> ITK's LPS
        return np.array(img.TransformPhysicalPointToContinuousIndex(lps))

    if region.kind == 'box' and (not region.box or len(region.box) != 2):
        raise UsageError('a box region is [[lo...], [hi...]]')
    if region.kind == 'point' and not region.point:
        raise UsageError('a point region gives "point" and "radius_mm"')
    corners = [index(p) for p in (region.box if region.kind == 'box' else [region.point])]
    inside = region_array(region, size, np.array(img.GetSpacing()), corners)
    out = sitk.GetImageFromArray(inside)
    out.SetOrigin(img.GetOrigin())
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(img.GetDirection())
    sitk.WriteImage(out, str(path), True)
    return str(path)
