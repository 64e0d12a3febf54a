"""Input cases in nnU-Net naming (CASE_0000.ext, CASE_0001.ext ...), read and checked with the model's reader."""
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UsageError


def _split(path: Path, endings: Sequence[str]) -> Tuple[str, str]:
    """(stem, ending) with the longest supported ending, so case_0000.nii.gz -> (case_0000, .nii.gz)."""
    for e in sorted(endings, key=len, reverse=True):
        if path.name.lower().endswith(e.lower()):
            return path.name[:-len(e)], e
    raise UsageError(f'{path} has an unsupported file ending; this model reads {", ".join(endings)}')


def list_folder(folder: Path, endings: Sequence[str], file_ending: Optional[str]) -> Tuple[List[Path], List[Path]]:
    """(images taken, images left out) of a folder, as nnU-Net lists it for a model: the files ending in the
    dataset's file ending, that exact case (nnU-Net's create_lists_from_splitted_dataset_folder), so that
    -num_parts splits the same cases. A folder without any holds other endings the reader takes: all of those."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and any(f.name.lower().endswith(e.lower())
                                                                       for e in endings))
    own = [f for f in files if file_ending and f.name.endswith(file_ending)]
    return (own, [f for f in files if f not in own]) if own else (files, [])


def find_cases(inputs: Sequence[str], endings: Sequence[str], channel_names: Dict[str, str],
               rgb_files: bool = False, file_ending: Optional[str] = None) -> Dict[str, List[str]]:
    """case id -> files ordered by channel. Channels are grouped by exact case id, never by prefix. With
    `rgb_files` (natural images) one file may hold several channels (RGB in CASE_0000.png): the reader counts.
    Folders are listed as nnU-Net lists them for `file_ending` (`list_folder`)."""
    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += list_folder(p, endings, file_ending)[0]
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f'input {item} does not exist; pass an image file, a list of files or a folder')
    if not files:
        raise UsageError(f'no images ending in {", ".join(endings)} in {" ".join(inputs)}; name them CASE_0000{endings[0]}')
    n_ch = len(channel_names)
    cases: Dict[str, Dict[int, str]] = {}
    for f in files:
        stem, _ = _split(f, endings)
        m = re.fullmatch(r'(.+)_(\d{4})', stem)
        if m:
            case, ch = m.group(1), int(m.group(2))
        elif n_ch == 1 and len(files) == 1:
            case, ch = stem, 0  # a single image path works for single-channel models
        else:
            raise UsageError(f'{f.name} is not in nnU-Net naming; rename it CASE_XXXX{_split(f, endings)[1]} '
                             f'with XXXX the channel (0000 for {channel_names.get("0", "channel 0")})')
        if ch in cases.setdefault(case, {}):
            raise UsageError(f'case {case} has channel {ch:04d} twice ({cases[case][ch]} and {f}); keep one')
        cases[case][ch] = str(f)
    out = {}
    for case, chans in sorted(cases.items()):
        missing = [c for c in range(n_ch) if c not in chans]
        if rgb_files and missing and sorted(chans) == list(range(len(chans))):
            missing = []  # read_case checks the channels the files hold
        extra = sorted(c for c in chans if c >= n_ch)
        if missing:
            names = ', '.join(f'{case}_{c:04d} ({channel_names.get(str(c), "?")})' for c in missing)
            raise UsageError(f'case {case} is missing channel {names}; the model takes {n_ch} channel(s): '
                             f'{", ".join(channel_names.values())}')
        if extra:
            raise UsageError(f'case {case} has extra channel {", ".join(f"{c:04d}" for c in extra)}; the model takes '
                             f'{n_ch} channel(s) ({", ".join(channel_names.values())}); remove the extra files')
        out[case] = [chans[c] for c in sorted(chans)]
    return out


def read_case(rw, files: Sequence[str], n_channels: int, three_d: bool) -> Tuple[np.ndarray, dict]:
    """The model's reader, with one-line messages for unreadable, wrong-dimension and non-finite images."""
    for f in files:
        try:
            import SimpleITK as sitk
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(f))
            reader.ReadImageInformation()
            dim = reader.GetDimension()
        except RuntimeError:
            dim = None  # not SimpleITK-readable; the model's reader decides below
        if dim is not None and dim not in (2, 3):
            raise UsageError(f'{f} has {dim} dimensions; nnU-Net takes 2D or 3D images with one file per channel: '
                             f'split it into CASE_0000, CASE_0001 ...')
        if dim == 2 and three_d:
            raise UsageError(f'{f} is a 2D image but this is a 3D model; use a 2d configuration or a 3D volume')
    try:
        data, props = rw.read_images(list(files))
    except Exception as e:
        raise UsageError(f'cannot read {", ".join(map(str, files))} ({type(e).__name__}: '
                         f'{str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"}); check that the file '
                         f'is a complete image the model\'s reader ({type(rw).__name__}) supports') from None
    if data.shape[0] != n_channels:
        raise UsageError(f'{", ".join(map(str, files))} hold{"s" if len(files) == 1 else ""} {data.shape[0]} '
                         f'channel(s) but the model takes {n_channels}; give one file per channel as CASE_0000, '
                         f'CASE_0001 ... (natural images: one RGB file holds three)')
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data))) or sum(map(_nifti_non_finite, files))
    if bad:
        raise UsageError(f'{", ".join(map(str, files))} has {bad} NaN/inf voxels; replace them (e.g. with 0) first')
    return data, props


def _nifti_non_finite(path: str) -> int:
    """NaN/inf voxels of a float NIfTI, counted from the file: SimpleITK (nnU-Net's SimpleITKIO) reads them as 0,
    where .mha and .nrrd keep them, so they are refused in every format alike."""
    if not str(path).lower().endswith(('.nii', '.nii.gz')):
        return 0
    import nibabel
    img = nibabel.load(str(path))
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        return 0
    voxels = np.asanyarray(img.dataobj)
    return int(voxels.size - np.count_nonzero(np.isfinite(voxels)))


def read_label(rw, path: str, image_props: dict, image_shape: Sequence[int], what: str) -> np.ndarray:
    """A label volume (target mask, previous-stage segmentation) that must share the input image's geometry."""
    if not Path(path).is_file():
        raise UsageError(f'{what} {path} does not exist; pass a label file in the input image\'s geometry')
    try:
        seg, props = rw.read_seg(path)
    except Exception as e:
        raise UsageError(f'cannot read {what} {path} ({type(e).__name__}); save it as a label volume') from None
    same = seg.shape[1:] == tuple(image_shape)
    a, b = props.get('sitk_stuff'), image_props.get('sitk_stuff')
    if same and a and b:
        same = all(np.allclose(a[k], b[k], atol=1e-3) for k in ('spacing', 'origin', 'direction'))
    if not same:
        raise UsageError(f'{what} {path} does not match the image geometry (size {list(seg.shape[1:])} vs '
                         f'{list(image_shape)}, or spacing/origin/direction differ); resample it onto the image first')
    return seg.astype(np.int16)


def select_part(cases: Dict[str, List[str]], num_parts: int, part_id: int) -> Dict[str, List[str]]:
    """nnU-Net's split (-num_parts / -part_id): the cases in order of their ids, every num_parts-th from part_id.
    Disjoint, together every case; an added case shifts later ones to other parts, and finished cases are skipped
    by whichever part meets them, so a cohort can grow and be run again."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise UsageError(f'-part_id {part_id} -num_parts {num_parts}: give 0 <= part_id < num_parts')
    ids = sorted(cases)[part_id::num_parts]
    return {c: cases[c] for c in ids}
