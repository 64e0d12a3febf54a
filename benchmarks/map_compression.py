"""Writing a 256³ float32 map as .nii.gz: SimpleITK's writer (one thread) against `gzip_on_cores` (one gzip member,
compressed in 4 MiB pieces at once, as pigz), on 1 and 2 cores; each file is checked to be one member.

    python benchmarks/map_compression.py      # a few seconds; benchmarks/results/map_compression.json

The map is CAM-like: smooth, peak 1, zero over most of the volume.
"""
import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_cam_core.export import gzip_on_cores


def cam_like(shape=(256, 256, 256)) -> np.ndarray:
    coarse = np.random.default_rng(0).random([s // 16 for s in shape]).astype(np.float32)
    a = ndimage.zoom(coarse, 16, order=3)
    a = np.clip((a - 0.6) / 0.4, 0, 1)
    return a.astype(np.float32)


def one_member(path: str) -> bool:
    d = zlib.decompressobj(wbits=31)
    d.decompress(Path(path).read_bytes())
    return d.eof and not d.unused_data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'map_compression.json')
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)
    arr = cam_like()
    img = sitk.GetImageFromArray(arr)
    times, sizes, members = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            path = os.path.join(tmp, 'sitk.nii.gz')
            t = time.perf_counter()
            sitk.WriteImage(img, path, True)
            times.setdefault('simpleitk', []).append(time.perf_counter() - t)
            sizes['simpleitk'], members['simpleitk'] = os.path.getsize(path), one_member(path)
            for cores in (1, 2):
                key, path = f'gzip_on_cores_{cores}', os.path.join(tmp, f'{cores}.nii.gz')
                t = time.perf_counter()
                sitk.WriteImage(img, path[:-3], False)
                gzip_on_cores(path[:-3], path, cores)
                times.setdefault(key, []).append(time.perf_counter() - t)
                sizes[key], members[key] = os.path.getsize(path), one_member(path)
                assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(path)), arr)
    rows = {k: {'best_s': round(min(v), 2), 'median_s': round(float(np.median(v)), 2), 'bytes': sizes[k],
                'one_member': members[k]} for k, v in times.items()}
    out = {'shape': list(arr.shape), 'cpu_cores': os.cpu_count(), 'load_average_1min': round(os.getloadavg()[0], 2),
           'rows': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
