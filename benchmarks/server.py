"""The explanation server on the 75-tile CPU case, side by side in one run:

    python benchmarks/server.py

tiny 3d_fullres fold 0, no TTA, gradcam at the default layer. First explanation through the server (model load and
preprocessing included), another class and another method on the cached case (with the forwards the kept layer
outputs stood in for, and the cache's size after the first: case, logits and layer outputs), a box around each lesion (the tiles it
overlaps and the time), and the
server's peak RSS with the case cached against a CLI run's. Then ten cases explained one after the other on a server whose
--cache-mb holds about four: the cache's bytes after each, and the peak RSS. Then the CLI path: `nnunetv2_cam
--server` processes on the case, first, another class, another method (wall time, imports included, and the ratio to
the first). Writes benchmarks/results/server.json.
"""
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from nnunetv2_cam_core.client import ServerClient
from nnunetv2_cam_core.demo import SPACING, build_tiny_models, default_cache, model_folder, write_sample_case


def timed(client, model, case, **request):
    t = time.perf_counter()
    job = client.wait(client.explain(model, case, folds=[0], tta=False, **request))
    assert job['status'] == 'done', job
    seconds = time.perf_counter() - t
    name = next(f for f in job['files'] if f.endswith('_cam.json'))
    sidecar = json.loads(client._call('GET', f'/jobs/{job["id"]}/files/{name}').content)
    return round(seconds, 2), sidecar['tiles'], sidecar['timings_s'], sidecar.get('forwards_from_layer_cache', 0)


def start(results: Path, tmp: Path, *extra, device: str = 'cpu') -> tuple:
    server = subprocess.Popen([sys.executable, '-m', 'nnunetv2_cam_core', 'serve', '--models', str(results),
                               '--port', '0', '--token-file', str(tmp / 'token'), '-device', device, *extra],
                              stdout=subprocess.PIPE, text=True)
    url = json.loads(server.stdout.readline())['url']
    return server, ServerClient(url, (tmp / 'token').read_text().strip())


def peak_rss_mb(pid: int) -> float:
    return int(next(line for line in Path(f'/proc/{pid}/status').read_text().splitlines()
                    if line.startswith('VmHWM')).split()[1]) / 1024


def ten_cases(results: Path, model_id: str, tmp: Path) -> dict:
    """Ten small cases (the demo's sample, other seeds) on a server whose cache holds about four."""
    cases = [write_sample_case(tmp / f'c{i}', seed=100 + i, name=f'c{i}') for i in range(10)]
    server, client = start(results, tmp / 'c0')  # one case alone: its bytes in the cache
    try:
        timed(client, model_id, client.upload([str(cases[0])]), classes=['lesion'])
        one_case_mb = client.health()['cache_bytes'] / 1024 ** 2
    finally:
        server.terminate()
        server.wait(10)
    limit_mb = round(4.5 * one_case_mb, 1)
    server, client = start(results, tmp / 'c1', '--cache-mb', str(limit_mb))
    try:
        cached, held, rss_after_one = [], [], None
        for case in cases:
            timed(client, model_id, client.upload([str(case)]), classes=['lesion'])
            h = client.health()
            cached.append(round(h['cache_bytes'] / 1024 ** 2, 1))
            held.append(h['cases'])
            rss_after_one = rss_after_one or peak_rss_mb(server.pid)
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    return {'one_case_cache_mb': round(one_case_mb, 1), 'cache_limit_mb': limit_mb,
            'cache_mb_after_each_case': cached, 'cases_uploaded_after_each': held,
            'within_limit': all(c <= limit_mb for c in cached),
            'peak_rss_mb_after_one_case': round(rss_after_one), 'peak_rss_mb_after_ten': round(rss)}


def cli_path(results: Path, model_id: str, case: Path, tmp: Path) -> dict:
    """`nnunetv2_cam --server` as separate processes on one case: the first run, then another class and another
    method (the case found on the server by its bytes, not uploaded again), each timed whole (imports included)."""
    server, client = start(results, tmp / 'cli-path')
    runs = {}
    try:
        for label, extra in (('first', ['--target-class', 'lesion']), ('another_class', ['--target-class', 'organ']),
                             ('another_method', ['--target-class', 'lesion', '--method', 'hirescam'])):
            t = time.perf_counter()
            subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', '--server', client.url[:-3], '--token-file',
                            str(tmp / 'cli-path' / 'token'), '-m', model_id, '-i', str(case), '-o',
                            str(tmp / 'cli-path' / label), '-f', '0', '--disable_tta', '--progress', 'none', *extra],
                           check=True)
            runs[label] = round(time.perf_counter() - t, 2)
        uploads = client.health()['counters']['uploads']
    finally:
        server.terminate()
        server.wait(10)
    return {**{f'{k}_s': v for k, v in runs.items()},
            **{f'{k}_ratio': round(v / runs['first'], 2) for k, v in runs.items() if k != 'first'},
            'uploads': uploads}


def main() -> int:
    results = build_tiny_models(default_cache())
    model = model_folder(results)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        case = write_sample_case(tmp, seed=11, shape=(40, 144, 144), spacing=SPACING, objects=12, name='large')
        t = time.perf_counter()
        subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', '-i', str(case), '-o', str(tmp / 'cli'), '-m',
                        str(model), '-f', '0', '--disable_tta', '--target-class', 'lesion', '-device', 'cpu',
                        '--progress', 'none'], check=True)
        cli_s = time.perf_counter() - t
        cli_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        server, client = start(results, tmp)
        model_id = str(model.relative_to(results))
        try:
            case_id = client.upload([str(case)])
            first = timed(client, model_id, case_id, classes=['lesion'])
            cache_mb = client.health()['cache_bytes'] / 1024 ** 2
            other = timed(client, model_id, case_id, classes=['organ'])
            method = timed(client, model_id, case_id, classes=['lesion'], method='hirescam')
            # a 7x7x5-voxel box around each lesion's centre: how many tiles it overlaps depends on where the lesion
            # lies in the tile grid
            from scipy import ndimage
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.parent / 'labels' / 'large.nii.gz'))) == 1
            parts, n = ndimage.label(truth)
            boxes = []
            for z, y, x in ndimage.center_of_mass(truth, parts, range(1, n + 1)):
                z, y, x = int(round(z)), int(round(y)), int(round(x))
                boxes.append(timed(client, model_id, case_id, classes=['lesion'],
                                   region={'kind': 'box', 'box': [[x - 3, y - 3, z - 2], [x + 3, y + 3, z + 2]]}))
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(10)
        many = ten_cases(results, model_id, tmp)
        cli = cli_path(results, model_id, case, tmp)
    rows = {'tiles': first[1], 'cli_run_s': round(cli_s, 2),
            'first_explanation_s': first[0],
            'another_class_cached_s': other[0], 'another_class_tiles': other[1],
            'another_class_ratio': round(other[0] / first[0], 2), 'another_class_forwards_from_layer_cache': other[3],
            'another_method_cached_s': method[0], 'another_method_tiles': method[1],
            'another_method_ratio': round(method[0] / first[0], 2),
            'another_method_forwards_from_layer_cache': method[3], 'cache_mb_after_first': round(cache_mb, 1),
            'boxes': [{'tiles': b[1], 's': b[0], 'ratio': round(b[0] / first[0], 2)} for b in sorted(boxes, key=lambda b: b[1])],
            'cli_peak_rss_mb': round(cli_rss), 'server_peak_rss_mb': round(rss),
            'rss_ratio': round(rss / cli_rss, 2), 'ten_cases': many, 'cli_path': cli}
    out = Path(__file__).parent / 'results'
    (out / 'server.json').write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
