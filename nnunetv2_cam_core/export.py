"""Back to the original image geometry, with nnU-Net's export steps, and atomic writing of a case's files."""
import json
import mmap
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape, \
    export_prediction_from_logits

from .errors import UsageError
from .outputs import CaseOutputs


def segmentation_to_original(logits: torch.Tensor, properties: dict, predictor) -> np.ndarray:
    """nnU-Net's own logits -> segmentation export: resample, argmax/regions, insert the crop, transpose back."""
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties)


def write_probabilities(logits: torch.Tensor, properties: dict, predictor, outputs: 'CaseOutputs', case: str) -> None:
    """CASE.npz (`probabilities`), CASE.pkl (the properties) and the segmentation, by nnU-Net's own export as
    nnUNetv2_predict --save_probabilities writes them."""
    ending = predictor.dataset_json['file_ending']
    stem = outputs.path(case + '.npz')[:-len('.npz')]
    outputs.path(case + '.pkl')
    outputs.path(case + ending)
    export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                  predictor.dataset_json, stem, save_probabilities=True,
                                  num_threads_torch=torch.get_num_threads())


def maps_to_original(maps: torch.Tensor, properties: dict, predictor) -> np.ndarray:
    """(n, *preprocessed) float maps -> (n, *original): the same resampling as nnU-Net's probabilities (spacing
    permuted by transpose_forward), zeros outside the crop, then transpose_backward."""
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    spacing = [properties['spacing'][i] for i in pm.transpose_forward]
    shape = properties['shape_after_cropping_and_before_resampling']
    current = cm.spacing if len(cm.spacing) == len(shape) else [spacing[0], *cm.spacing]
    resampled = np.asarray(cm.resampling_fn_probabilities(maps, shape, current, spacing), dtype=np.float32)
    np.maximum(resampled, 0, out=resampled)  # higher-order resampling can undershoot
    full = np.zeros((maps.shape[0], *properties['shape_before_cropping']), dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties['bbox_used_for_cropping'])
    return full.transpose([0] + [i + 1 for i in pm.transpose_backward])


def cam_format(rw, properties: dict) -> str:
    """How this model's reader-writer lets a float map be written, decided before the work: 'image' (float image
    with the reader's geometry), 'tiff' (float32 TIFF plus nnU-Net's spacing .json) or 'png' (16-bit PNG, 0..65535
    for 0..1, plus the exact .npy)."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO
    if 'sitk_stuff' in properties or 'nibabel_stuff' in properties:
        return 'image'
    if isinstance(rw, Tiff3DIO):
        return 'tiff'
    if isinstance(rw, NaturalImage2DIO):
        return 'png'
    raise UsageError(f'this model\'s image reader/writer ({type(rw).__name__}) keeps no geometry a CAM could be '
                     f'written with; NNUNetCAM writes CAMs for SimpleITKIO, NibabelIO, Tiff3DIO and NaturalImage2DIO '
                     f'models')


def write_map(arr: np.ndarray, outputs: 'CaseOutputs', stem: str, ending: str, properties: dict, fmt: str,
              normalised: bool = True) -> str:
    """One float map in the case's geometry, in the format `cam_format` chose; returns the file name."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if fmt == 'image':
        write_float_image(arr, outputs.path(stem + ending), properties)
        return stem + ending
    if fmt == 'tiff':
        import tifffile
        tifffile.imwrite(outputs.path(stem + ending), arr, photometric='minisblack')
        with open(outputs.path(stem + '.json'), 'w') as f:
            json.dump({'spacing': [float(x) for x in properties['spacing']]}, f)
        return stem + ending
    np.save(outputs.path(stem + '.npy'), arr[0])
    if not normalised:
        return stem + '.npy'  # a PNG holds no unnormalised values
    from PIL import Image
    Image.fromarray(np.round(np.clip(arr[0], 0, 1) * 65535).astype(np.uint16)).save(outputs.path(stem + '.png'))
    return stem + '.png'


def write_float_image(arr: np.ndarray, path: str, properties: dict) -> None:
    """A float32 map with the reader's geometry (nnU-Net's write_seg would cast it to integers). With two cores or
    more a .nii.gz is written as .nii and compressed on all of them (`gzip_on_cores`)."""
    cores = compressing_cores()
    if cores < 2 or not path.endswith('.nii.gz'):
        return _write_float_image(arr, path, properties)
    _write_float_image(arr, path[:-3], properties, compress=False)
    gzip_on_cores(path[:-3], path, cores)


def compressing_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


GZIP_PIECE, GZIP_LEVEL, WINDOW = 1 << 22, 6, 1 << 15
# the header of a gzip member (RFC 1952): deflate, no flags, no time, no extra flags, OS unknown
GZIP_HEADER = b'\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff'


def _deflate_piece(m, start: int, end: int, last: bool) -> bytes:
    """A raw deflate stream of m[start:end] that continues the one before it, as pigz's: the 32 KiB before the
    piece as the preset dictionary (the window its back-references may reach), ended by a sync flush (byte
    aligned, not final) except for the last piece."""
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=m[max(0, start - WINDOW):start]) if start else \
        zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return c.compress(m[start:end]) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def gzip_on_cores(source: str, target: str, cores: int) -> None:
    """source -> target as ONE gzip member, compressed in 4 MiB pieces at once, as pigz does (readers that stop at
    the first member, such as web viewers' fflate, read it whole); source is removed. At most 2 x cores pieces are
    held at a time; the CRC runs alongside."""
    window = 2 * cores * GZIP_PIECE
    crc = 0
    with open(source, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, \
            open(target, 'wb') as out, ThreadPoolExecutor(cores) as pool:  # zlib lets go of the GIL
        out.write(GZIP_HEADER)
        size = len(m)
        for start in range(0, size, window):
            jobs = [pool.submit(_deflate_piece, m, i, min(i + GZIP_PIECE, size), i + GZIP_PIECE >= size)
                    for i in range(start, min(start + window, size), GZIP_PIECE)]
            crc = zlib.crc32(m[start:start + window], crc)
            for job in jobs:
                out.write(job.result())
        out.write(struct.pack('<II', crc, size & 0xFFFFFFFF))
    os.remove(source)


def _write_float_image(arr: np.ndarray, path: str, properties: dict, compress: bool = True) -> None:
    if 'sitk_stuff' in properties:
        import SimpleITK as sitk
        st = properties['sitk_stuff']
        img = sitk.GetImageFromArray(arr[0] if len(st['spacing']) == 2 else arr)
        img.SetSpacing(st['spacing'])
        img.SetOrigin(st['origin'])
        img.SetDirection(st['direction'])
        if 'original_orientation' in st:
            img = sitk.DICOMOrient(img, st['original_orientation'])
        sitk.WriteImage(img, path, compress)
    else:
        import nibabel
        nb = properties['nibabel_stuff']
        if 'reoriented_affine' in nb:
            from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
            img = nibabel.Nifti1Image(arr.transpose((2, 1, 0)), affine=nb['reoriented_affine'])
            img = img.as_reoriented(ornt_transform(axcodes2ornt('RAS'), io_orientation(nb['original_affine'])))
        else:
            img = nibabel.Nifti1Image(arr.transpose((2, 1, 0)), affine=nb['original_affine'])
        nibabel.save(img, path)


def window(image: np.ndarray) -> np.ndarray:
    vals = image[image != 0] if np.any(image != 0) else image
    lo, hi = np.percentile(vals, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Jet CAM over a windowed gray slice, as uint8 RGB; weak activation stays see-through."""
    from matplotlib import colormaps
    jet = colormaps['jet'](cam)[..., :3]
    alpha = 0.55 * np.clip(cam * 4, 0, 1)[..., None]
    rgb = gray[..., None] * (1 - alpha) + jet * alpha
    return (rgb * 255).astype(np.uint8)


def write_slices(image: np.ndarray, cam: np.ndarray, folder: str, case: str) -> None:
    """One PNG per slice (first array axis): jet CAM over the original intensities, window from percentiles."""
    from PIL import Image
    os.makedirs(folder)
    gray = window(image.astype(np.float32))
    for k in range(image.shape[0]):
        Image.fromarray(overlay(gray[k], cam[k])).save(os.path.join(folder, f'{case}_{k:03d}.png'))


def overview_row(gray: np.ndarray, seg: np.ndarray, cam: np.ndarray, title: str) -> np.ndarray:
    """image | segmentation | CAM overlay at the slice (first axis) with the most CAM (no CAM: the most segmentation,
    else the middle one), titled, as uint8 RGB; `gray` windowed to 0..1."""
    from PIL import Image, ImageDraw
    per_slice = cam.reshape(cam.shape[0], -1).sum(1)
    if not per_slice.any():
        per_slice = (seg > 0).reshape(seg.shape[0], -1).sum(1)
    k = int(np.argmax(per_slice)) if per_slice.any() else cam.shape[0] // 2
    g = (np.repeat(gray[k][..., None], 3, -1) * 255).astype(np.uint8)
    s = g.copy()
    palette = np.array([[0, 0, 0], [255, 80, 80], [80, 200, 255], [120, 255, 120], [255, 220, 60]], np.uint8)
    lab = seg[k]
    s[lab > 0] = (0.5 * s[lab > 0] + 0.5 * palette[np.minimum(lab[lab > 0], len(palette) - 1)]).astype(np.uint8)
    row = np.concatenate([g, s, overlay(gray[k], cam[k])], 1)
    scale = max(1, 192 // row.shape[0])
    img = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    ImageDraw.Draw(img).text((4, 2), f'{title}  (slice {k})  image | segmentation | CAM', fill=(255, 255, 0))
    return np.asarray(img)


def stack_rows(rows, path: str) -> None:
    """Rows of pictures, padded to the widest, one under the other, as one PNG."""
    from PIL import Image
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def write_overview(image: np.ndarray, seg: np.ndarray, cams: Dict[str, np.ndarray], path: str) -> None:
    """One picture per case: for each class, the slice with the most CAM, image | segmentation | CAM overlay."""
    gray = window(image.astype(np.float32))
    stack_rows([overview_row(gray, seg, cam, name) for name, cam in cams.items()], path)
