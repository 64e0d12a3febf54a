"""Volumes to files for the core, and the core's files back to nodes with the input's exact geometry.
MRML only (works with the `slicer-core` wheel): storage nodes write and read, no slicer.util loaders that need the app."""
import hashlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import vtk

import slicer

# NIfTI stores geometry as float32: what comes back may differ from the input by rounding, never by more
GEOMETRY_TOLERANCE_MM = 1e-3
SEGMENT_COLORS = [(0.90, 0.30, 0.25), (0.25, 0.60, 0.95), (0.35, 0.80, 0.35), (0.95, 0.75, 0.20),
                  (0.70, 0.40, 0.85), (0.20, 0.80, 0.80), (0.95, 0.50, 0.70), (0.60, 0.60, 0.30)]


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _array(m)


def write_volume(node, path: Path) -> None:
    """The node's voxels with its own IJK-to-RAS (parent transforms are not applied, as for any Slicer export).
    The node itself is not changed: a storage node of our own does the writing."""
    if node.GetImageData() is None:
        raise ValueError(f'volume {node.GetName()!r} has no voxels; load an image into it first')
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(node) or not Path(path).is_file():
        raise OSError(f'could not write {node.GetName()!r} to {path}; check free disk space and permissions')


class CaseContent:
    """What write_case writes, known without writing it: each channel's voxels (read in place), their type and shape,
    and the IJK-to-RAS written with them (parent transforms are not written). key() may run on another thread."""

    def __init__(self, channels, ending: str):
        self.ending, self._parts = ending, []
        for node in channels:
            image = node.GetImageData()
            if image is None:
                raise ValueError(f'volume {node.GetName()!r} has no voxels; load an image into it first')
            self._parts.append((node, image, slicer.util.arrayFromVolume(node), ijk_to_ras(node), image.GetMTime()))

    def key(self) -> Optional[str]:
        """sha256 of the channels in order; None if a volume changed while it was read."""
        digest = hashlib.sha256(self.ending.encode())
        for _, _, voxels, matrix, _ in self._parts:
            digest.update(f'{voxels.dtype.str} {voxels.shape} '.encode() + matrix.tobytes())
            digest.update(np.ascontiguousarray(voxels))  # hashlib lets go of the GIL for large buffers
        return digest.hexdigest() if self.unchanged(geometry=False) else None

    def unchanged(self, geometry: bool = True) -> bool:
        """The voxels (and the IJK-to-RAS, which only the caller's thread reads) are still those read."""
        return all(image.GetMTime() == mtime and node.GetImageData() is image and
                   (not geometry or np.array_equal(ijk_to_ras(node), matrix))
                   for node, image, _, matrix, mtime in self._parts)


def write_case(folder: Path, channels, ending: str, case: str) -> list:
    """One file per channel in nnU-Net naming (CASE_0000, CASE_0001, ...), in the order the model expects."""
    files = [Path(folder) / f'{case}_{i:04d}{ending}' for i in range(len(channels))]
    for node, path in zip(channels, files):
        write_volume(node, path)
    return files


def _read_into(node, path: Path, reference) -> None:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f'could not read the core output {path}')
    check_same_grid(node, reference, Path(path).name)
    node.SetIJKToRASMatrix(_matrix(ijk_to_ras(reference)))  # the input's matrix exactly, not the file's float32
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())


def check_same_grid(node, reference, what: str) -> None:
    dims, ref_dims = node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions()
    diff = np.abs(ijk_to_ras(node) - ijk_to_ras(reference)).max()
    if dims != ref_dims or diff > GEOMETRY_TOLERANCE_MM:
        raise ValueError(f'{what} is not on the input\'s voxel grid (size {dims} vs {ref_dims}, IJK-to-RAS off by '
                         f'{diff:.3g}); report this with the log: the core must write in the input geometry')


def load_scalar(scene, path: Path, name: str, reference):
    node = scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', name)
    try:
        _read_into(node, path, reference)
    except Exception:
        scene.RemoveNode(node)
        raise
    return node


def load_segmentation(scene, path: Path, name: str, reference, labels: Dict[str, object],
                      regions: Optional[Dict[str, list]] = None):
    """The label file as a segmentation node, named and coloured from dataset.json's labels: one segment per label
    value present, or for a region model one segment per region (the voxels holding any of its labels), which
    may overlap as the regions do."""
    labelmap = scene.AddNewNodeByClass('vtkMRMLLabelMapVolumeNode', name + ' labelmap')
    segmentation = scene.AddNewNodeByClass('vtkMRMLSegmentationNode', name)
    try:
        _read_into(labelmap, path, reference)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segmentation.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
        seg = segmentation.GetSegmentation()
        if regions:
            values = slicer.util.arrayFromVolume(labelmap).copy()
            for k, (region, covered) in enumerate(regions.items()):
                # each region its own labelmap (a layer of its own), so that regions overlap
                slicer.util.arrayFromVolume(labelmap)[:] = np.isin(values, covered)
                slicer.util.arrayFromVolumeModified(labelmap)
                # under the segmentation's own parent transform (the input's): no resampling, no transform twice
                image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
                    labelmap, segmentation.GetParentTransformNode())
                if image is None:
                    raise ValueError(f'could not import region {region!r} of {Path(path).name}')
                image.UnRegister(None)  # a New()'d object: take ownership, as Slicer's own scripts do
                segment = slicer.vtkSegment()
                segment.SetName(region)
                segment.SetColor(*SEGMENT_COLORS[k % len(SEGMENT_COLORS)])
                segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
                if not seg.AddSegment(segment, region):
                    raise ValueError(f'could not import region {region!r} of {Path(path).name}')
            segmentation.CreateDefaultDisplayNodes()  # as ImportLabelmapToSegmentationNode does for labels
            return segmentation
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            raise ValueError(f'could not import {Path(path).name} as a segmentation')
        names = {v: k for k, v in labels.items() if isinstance(v, int)}
        for i in range(seg.GetNumberOfSegments()):
            segment = seg.GetNthSegment(i)
            value = segment.GetLabelValue()
            segment.SetName(names.get(value, f'label {value}'))
            segment.SetColor(*SEGMENT_COLORS[(value - 1) % len(SEGMENT_COLORS)])
    except Exception:
        scene.RemoveNode(segmentation)
        raise
    finally:
        scene.RemoveNode(labelmap)
    return segmentation


def write_target_mask(scene, reference, path: Path, segmentation=None, segment_id: Optional[str] = None,
                      roi=None, point=None, radius_mm: float = 10.0) -> None:
    """A segment, the voxels inside a markups ROI, or those within `radius_mm` of a markups point (its first
    control point), as a 0/1 label file on the input's voxel grid."""
    labelmap = scene.AddNewNodeByClass('vtkMRMLLabelMapVolumeNode', 'NNUNetCAM target mask')
    try:
        if segmentation is not None:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap,
                                                                                          reference):
                raise ValueError(f'could not export segment {segment_id!r} onto the input volume\'s grid')
            mask = slicer.util.arrayFromVolume(labelmap) > 0
            where = (slice(None),) * 3
        else:
            where, mask = region_block(reference, roi, point, radius_mm)
        if not mask.any():
            raise ValueError('the target region does not overlap the input volume; move the segment, ROI or point '
                             'onto it')
        image = vtk.vtkImageData()
        image.SetDimensions(reference.GetImageData().GetDimensions())
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        labelmap.SetAndObserveImageData(image)
        labelmap.SetIJKToRASMatrix(_matrix(ijk_to_ras(reference)))
        voxels = slicer.util.arrayFromVolume(labelmap)
        voxels[:] = 0
        voxels[where] = mask
        write_volume(labelmap, path)
    finally:
        scene.RemoveNode(labelmap)


def _ijk_to_world(reference) -> np.ndarray:
    to_world = ijk_to_ras(reference)
    transform = reference.GetParentTransformNode()
    if transform is not None:
        m = vtk.vtkMatrix4x4()
        if not transform.GetMatrixTransformToWorld(m):
            raise ValueError('the input volume is under a non-linear transform; harden it before using an ROI or '
                             'point')
        to_world = _array(m) @ to_world
    return to_world


def region_block(reference, roi=None, point=None, radius_mm: float = 10.0) -> tuple:
    """(slices in K, J, I order, the voxels there whose world-coordinate centres lie inside the markups ROI or within
    `radius_mm` of the point list's first control point): drawn inside the region's bounding box on `reference`'s
    grid alone, as the server draws its regions (a whole CT's grid would take seconds)."""
    to_world = _ijk_to_world(reference)
    to_ijk = np.linalg.inv(to_world)
    if roi is not None:
        roi_to_world = _array(roi.GetObjectToWorldMatrix())
        to_roi = np.linalg.inv(roi_to_world)
        half = np.array(roi.GetSize()) / 2
        corners = np.array([[x * half[0], y * half[1], z * half[2], 1] for x in (-1, 1) for y in (-1, 1)
                            for z in (-1, 1)]).T
        ijk = (to_ijk @ roi_to_world @ corners)[:3]
        lo, hi = ijk.min(1), ijk.max(1)

        def inside(p):
            return (np.abs((to_roi @ p)[:3]) <= half[:, None] + 1e-6).all(0)
    else:
        if point.GetNumberOfControlPoints() < 1:
            raise ValueError(f'{point.GetName()!r} has no point; click one onto the image first')
        centre = [0.0, 0.0, 0.0]
        point.GetNthControlPointPositionWorld(0, centre)
        c = np.array(centre)[:, None]
        # a ball of radius r reaches r * |row k of the world-to-IJK matrix| along index k
        reach = radius_mm * np.linalg.norm(to_ijk[:3, :3], axis=1)
        middle = (to_ijk @ [*centre, 1])[:3]
        lo, hi = middle - reach, middle + reach

        def inside(p):
            return np.linalg.norm(p[:3] - c, axis=0) <= radius_mm
    dims = np.array(reference.GetImageData().GetDimensions())
    start = np.clip(np.floor(lo - 1e-6), 0, dims).astype(int)
    stop = np.clip(np.ceil(hi + 1e-6) + 1, 0, dims).astype(int)
    stop = np.maximum(stop, start)
    block = np.zeros((stop - start)[::-1], bool)
    j, i = np.mgrid[start[1]:stop[1], start[0]:stop[0]]
    for n, k in enumerate(range(start[2], stop[2])):  # a slice at a time: a coordinate array is 4 floats a voxel
        ijk = np.stack([i.ravel(), j.ravel(), np.full(i.size, k), np.ones(i.size)])
        block[n] = inside(to_world @ ijk).reshape(i.shape)
    return tuple(slice(a, b) for a, b in zip(start[::-1], stop[::-1])), block


def _full(reference, where: tuple, block: np.ndarray) -> np.ndarray:
    out = np.zeros(reference.GetImageData().GetDimensions()[::-1], bool)
    out[where] = block
    return out


def roi_mask(reference, roi) -> np.ndarray:
    """Voxels of `reference` (K, J, I order) whose centres lie inside the ROI, both in world coordinates."""
    return _full(reference, *region_block(reference, roi=roi))


def point_mask(reference, point, radius_mm: float) -> np.ndarray:
    """Voxels of `reference` (K, J, I order) within `radius_mm` of the markups point's first control point (world)."""
    return _full(reference, *region_block(reference, point=point, radius_mm=radius_mm))


def _array(m) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _matrix(a: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, a[i, j])
    return m
