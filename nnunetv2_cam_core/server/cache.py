"""What the server keeps, each bounded: loaded models, preprocessed cases, stitched logits and layer outputs in memory
(`Cache`, --cache-mb), and the uploaded cases on disk (`Cases`, --uploads-mb and --case-ttl-s), both least recently
used dropped first. An uploaded case is addressed by its content: the same bytes give the same case id."""
import hashlib
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from fastapi import HTTPException


class Cache:
    """Least recently used entries, bounded by bytes."""

    def __init__(self, limit_bytes: int):
        self.limit, self.items, self.lock = limit_bytes, OrderedDict(), threading.RLock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
        return None

    def put(self, key, value, nbytes: int) -> None:
        """The entry stays, even one over the limit alone."""
        with self.lock:
            self.items.pop(key, None)
            self.reserve(nbytes)
            self.items[key] = (value, nbytes)

    def reserve(self, nbytes: int) -> None:
        """Room for nbytes more, the least recently used dropped first."""
        with self.lock:
            while self.items and self.bytes() + nbytes > self.limit:
                self.items.popitem(last=False)

    def drop(self, match) -> None:
        with self.lock:
            for key in [k for k in self.items if match(k)]:
                del self.items[key]

    def keys(self) -> list:
        with self.lock:
            return list(self.items)

    def bytes(self) -> int:
        with self.lock:
            return sum(n for _, n in self.items.values())


def case_id(ending: str, sha256: List[str]) -> str:
    """A case's id from its channels' contents (and format): the same bytes, the same id."""
    return hashlib.sha256(' '.join([ending, *sha256]).encode()).hexdigest()[:16]


@dataclass
class Case:
    id: str
    name: str          # the first upload's, for its outputs unless a request names them
    folder: Path
    files: List[str]   # one per channel
    ending: str
    sha256: List[str]
    bytes: int
    size: tuple = ()     # the first channel's header: voxels (i, j, k) and spacing
    spacing: tuple = ()
    used: float = field(default_factory=time.monotonic)
    jobs: int = 0      # queued or running jobs on it: it stays while they need it

    def public(self) -> dict:
        return {'id': self.id, 'name': self.name, 'channels': len(self.files), 'bytes': self.bytes,
                'sha256': self.sha256}


class Cases:
    """Uploaded cases on disk, bounded in bytes and unused lifetime; `forgotten(case_id)` is told of each removed."""

    def __init__(self, folder: Path, limit_bytes: int, ttl_s: float, forgotten: Callable[[str], None]):
        self.folder, self.limit, self.ttl_s, self.forgotten = folder, limit_bytes, ttl_s, forgotten
        self.items: 'OrderedDict[str, Case]' = OrderedDict()
        self.lock = threading.RLock()

    def get(self, case_id: str) -> Optional[Case]:
        with self.lock:
            self.expire()
            case = self.items.get(case_id)
            if case is not None:
                case.used = time.monotonic()
                self.items.move_to_end(case_id)
            return case

    def add(self, staged: Path, name: str, ending: str, sha256: List[str], nbytes: int, header: tuple) -> tuple:
        """(case, new): the staged folder's files as a case, or the case that already holds these bytes (the
        staged copy removed). Room is made by removing unused cases, least recently used first."""
        cid = case_id(ending, sha256)
        with self.lock:
            known = self.get(cid)
            if known is not None:
                shutil.rmtree(staged, ignore_errors=True)
                return known, False
            idle = [c for c in self.items.values() if not c.jobs]
            while idle and self.bytes() + nbytes > self.limit:
                self.remove(idle.pop(0).id)
            if self.bytes() + nbytes > self.limit:
                shutil.rmtree(staged, ignore_errors=True)
                raise HTTPException(507, f'the server\'s room for uploads (--uploads-mb {self.limit / 1024 ** 2:g}) '
                                         f'is held by cases in use; retry when their jobs end',
                                    headers={'Retry-After': '30'})
            folder = self.folder / cid
            staged.rename(folder)
            files = [str(folder / Path(f).name) for f in sorted(p.name for p in folder.iterdir())]
            case = self.items[cid] = Case(cid, name, folder, files, ending, sha256, nbytes, *header)
            return case, True

    def remove(self, case_id: str) -> None:
        with self.lock:
            case = self.items.pop(case_id, None)
        if case is not None:
            self.forgotten(case_id)
            shutil.rmtree(case.folder, ignore_errors=True)

    def expire(self) -> None:
        """Remove the cases no job needs that were not used for ttl_s."""
        with self.lock:
            now = time.monotonic()
            for case in [c for c in self.items.values() if not c.jobs and now - c.used > self.ttl_s]:
                self.remove(case.id)

    def find(self, ending: str, sha256: List[str]) -> Optional[Case]:
        return self.get(case_id(ending, sha256))

    def bytes(self) -> int:
        with self.lock:
            return sum(c.bytes for c in self.items.values())

    def __len__(self) -> int:
        return len(self.items)
