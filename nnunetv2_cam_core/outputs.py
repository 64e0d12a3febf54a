"""Where a case's files go: the output folder checked, and the files written all or none. No torch here: a run on
an explanation server (`--server`) writes through this alone."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

from .errors import UsageError


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.nnunetcam-write-test-', dir=folder)  # unique across parts and nodes
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f'output folder {folder} is not writable ({e.strerror}); choose another -o') from None


class CaseOutputs:
    """Collects a case's files in a hidden temp folder inside the output folder; `commit` moves them all into place,
    and leaving the block by an exception removes them, so a failed or cancelled run leaves nothing partial."""

    def __init__(self, output_folder: Path):
        self.output_folder = output_folder
        self.tmp = Path(tempfile.mkdtemp(prefix='.nnunetcam-', dir=output_folder))
        self.files: Dict[str, Path] = {}

    def path(self, name: str) -> str:
        self.files[name] = self.tmp / name
        return str(self.files[name])

    def commit(self) -> Dict[str, str]:
        out = {}
        # the sidecar goes last: its presence marks a finished case (resume)
        for name in sorted(self.files, key=lambda n: n.endswith('_cam.json')):
            dest = self.output_folder / name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(self.files[name], dest)
            out[name] = str(dest)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        shutil.rmtree(self.tmp, ignore_errors=True)
