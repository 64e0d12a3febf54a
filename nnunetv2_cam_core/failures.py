"""A batch's failed cases, in OUTPUT/failures.json: parts running at once into one folder share it under a file
lock; a case that later succeeds leaves it, and the file goes when no case is left."""
import json
import os
import time
from pathlib import Path
from typing import Sequence

from filelock import FileLock


class Failures:
    def __init__(self, folder: Path):
        self.path = folder / 'failures.json'
        self.lock = FileLock(str(folder / '.failures.json.lock'))

    def add(self, case: str, inputs: Sequence[str], message: str, part: str) -> None:
        self._update(lambda e: e.__setitem__(case, {'error': message, 'inputs': list(inputs), 'part': part,
                                                    'time': time.strftime('%Y-%m-%dT%H:%M:%S')}))

    def clear(self, case: str) -> None:
        if self.path.is_file():
            self._update(lambda e: e.pop(case, None))

    def _update(self, change) -> None:
        try:
            self.lock.acquire()
        except OSError:  # a file system without locks (some Lustre and NFS mounts): update without one
            return self._apply(change)
        try:
            self._apply(change)
        finally:
            self.lock.release()

    def _apply(self, change) -> None:
        entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
        change(entries)
        if entries:
            tmp = self.path.with_name(f'.failures.json.{os.getpid()}')
            tmp.write_text(json.dumps(entries, indent=2))
            os.replace(tmp, self.path)
        elif self.path.is_file():
            self.path.unlink()
