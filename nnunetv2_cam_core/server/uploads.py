"""What an uploaded file may be: one of a few single-file image formats whose voxels are inline, recognised from its
header (not its name), with no more voxels than --max-voxels and no more than a deflate stream can expand to."""
import gzip
import re
import zlib
from pathlib import Path

from fastapi import HTTPException

from ..client import ENDINGS

# ending -> (format recognised from the header, SimpleITK's ImageIO for it)
FORMATS = {'.nii.gz': ('gzipped NIfTI', 'NiftiImageIO'), '.nii': ('NIfTI', 'NiftiImageIO'),
           '.nrrd': ('NRRD', 'NrrdImageIO'), '.mha': ('MetaImage', 'MetaImageIO'),
           '.png': ('PNG', 'PNGImageIO'), '.tif': ('TIFF', 'TIFFImageIO'), '.tiff': ('TIFF', 'TIFFImageIO')}
assert tuple(FORMATS) == ENDINGS
MAX_RATIO = 1100  # deflate expands at most 1032:1; more voxels than that per stored byte: a damaged or crafted file
HEADER = 1 << 16  # the text headers (NRRD, MetaImage) end within this


def ending_of(name: str):
    return next((e for e in ENDINGS if name.lower().endswith(e)), None)


def _nifti(head: bytes) -> str:
    """None for a single-file NIfTI-1/2, else why not."""
    for order in ('little', 'big'):
        size = int.from_bytes(head[:4], order)
        if size == 348:
            return None if head[344:348] == b'n+1\0' else 'a NIfTI header whose voxels are in another file (.img)'
        if size == 540:
            return None if head[4:8] == b'n+2\0' else 'a NIfTI-2 header whose voxels are in another file'
    return 'not a NIfTI header'


def _nrrd(head: bytes) -> str:
    if not head.startswith(b'NRRD000'):
        return 'not an NRRD header'
    for line in head.split(b'\n\n', 1)[0].split(b'\n')[1:]:
        field = line.split(b':', 1)[0].strip().lower()
        if not line.startswith(b'#') and b':=' not in line and field in (b'data file', b'datafile'):
            return 'an NRRD header naming another file for its voxels ("data file")'
    return None


def _metaimage(head: bytes) -> str:
    if not re.match(rb'\s*\w+\s*=', head):
        return 'not a MetaImage header'
    for line in head.split(b'\n'):
        key, _, value = line.partition(b'=')
        if key.strip().lower() == b'elementdatafile':
            return None if value.strip().upper() == b'LOCAL' else \
                'a MetaImage header naming another file for its voxels (ElementDataFile other than LOCAL)'
    return 'a MetaImage header without inline voxels (no "ElementDataFile = LOCAL")'


def _png(head: bytes) -> str:
    return None if head.startswith(b'\x89PNG\r\n\x1a\n') else 'not a PNG file'


def _tiff(head: bytes) -> str:
    return None if head[:4] in (b'II*\0', b'MM\0*', b'II+\0', b'MM\0+') else 'not a TIFF file'


def header_problem(path: Path, ending: str) -> str:
    """Why the file is not a single-file image of its ending's format with inline voxels; None if it is."""
    try:
        with (gzip.open if ending == '.nii.gz' else open)(path, 'rb') as f:
            head = f.read(HEADER)
    except (OSError, EOFError, zlib.error):
        return 'not a gzip file'
    check = {'.nii.gz': _nifti, '.nii': _nifti, '.nrrd': _nrrd, '.mha': _metaimage, '.png': _png,
             '.tif': _tiff, '.tiff': _tiff}[ending]
    return check(head)


def check_image(path: Path, ending: str, upload_name: str, max_voxels: int) -> tuple:
    """(size, spacing) from the header; 415/413 unless the file is an allowed image within the bounds."""
    import SimpleITK as sitk
    problem = header_problem(path, ending)
    if problem:
        raise HTTPException(415, f'{upload_name} is {problem}; upload {FORMATS[ending][0]} with its voxels inside '
                                 f'the file ({", ".join(ENDINGS)})')
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(FORMATS[ending][1])  # the format recognised above, not one another reader might claim
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise HTTPException(415, f'{upload_name}: its {FORMATS[ending][0]} header cannot be read; upload a '
                                 f'complete image') from None
    size = reader.GetSize()
    voxels = 1
    for n in size:
        voxels *= n
    voxels *= reader.GetNumberOfComponents()
    if voxels > max_voxels:
        raise HTTPException(413, f'{upload_name} claims {"x".join(map(str, size))} voxels ({voxels}), more than '
                                 f'--max-voxels {max_voxels}; crop or resample it, or start the server with a larger '
                                 f'--max-voxels')
    decoded = voxels * sitk.Image([1] * len(size), reader.GetPixelID()).GetSizeOfPixelComponent()
    stored = path.stat().st_size
    if decoded > MAX_RATIO * stored:
        raise HTTPException(413, f'{upload_name} claims {decoded} bytes of voxels in {stored} bytes, more than '
                                 f'{MAX_RATIO}x: the file is damaged or made to exhaust memory; upload the image again')
    return size, reader.GetSpacing()
