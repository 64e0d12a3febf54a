"""The explanation server on the 75-tile CPU case, side by side in one run:

    python benchmarks/server.py

tiny 3d_fullres fold 0, no TTA, gradcam at the default layer. First explanation through the server (model load and
preprocessing included), another class and another method on the cached case, a box around one object (a few tiles), and the
server's peak RSS with the case cached against a CLI run's. Writes benchmarks/results/server.json.
"""
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_cam_core.client import ServerClient
from nnunetv2_cam_core.demo import SPACING, build_tiny_models, default_cache, model_folder, write_sample_case


def timed(client, model, case, **request):
    t = time.perf_counter()
    job = client.wait(client.explain(model, case, folds=[0], tta=False, **request), poll_s=0.05)
    assert job['status'] == 'done', job
    seconds = time.perf_counter() - t
    name = next(f for f in job['files'] if f.endswith('_cam.json'))
    sidecar = json.loads(client._call('GET', f'/jobs/{job["id"]}/files/{name}').content)
    return round(seconds, 2), sidecar['tiles']


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
        server = subprocess.Popen([sys.executable, '-m', 'nnunetv2_cam_core', 'serve', '--models', str(results),
                                   '--port', '0', '--token-file', str(tmp / 'token'), '-device', 'cpu'],
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = json.loads(server.stdout.readline())['url']
            client = ServerClient(url, (tmp / 'token').read_text().strip())
            model_id = str(model.relative_to(results))
            case_id = client.upload([str(case)])
            first = timed(client, model_id, case_id, classes=['lesion'])
            other = timed(client, model_id, case_id, classes=['organ'])
            method = timed(client, model_id, case_id, classes=['lesion'], method='hirescam')
            # a box around the brightest object's centre
            img = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
            z, y, x = (int(v) for v in np.unravel_index(int(np.argmax(img)), img.shape))
            box = timed(client, model_id, case_id, classes=['lesion'],
                        region={'kind': 'box', 'box': [[x - 3, y - 3, z - 2], [x + 3, y + 3, z + 2]]})
            rss = int(next(line for line in Path(f'/proc/{server.pid}/status').read_text().splitlines()
                           if line.startswith('VmHWM')).split()[1]) / 1024
        finally:
            server.terminate()
            server.wait(10)
    rows = {'tiles': first[1], 'cli_run_s': round(cli_s, 2),
            'first_explanation_s': first[0],
            'another_class_cached_s': other[0], 'another_class_tiles': other[1],
            'another_class_ratio': round(other[0] / first[0], 2),
            'another_method_cached_s': method[0], 'another_method_tiles': method[1],
            'another_method_ratio': round(method[0] / first[0], 2),
            'box_s': box[0], 'box_tiles': box[1], 'box_ratio': round(box[0] / first[0], 2),
            'cli_peak_rss_mb': round(cli_rss), 'server_peak_rss_mb': round(rss),
            'rss_ratio': round(rss / cli_rss, 2)}
    out = Path(__file__).parent / 'results'
    (out / 'server.json').write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
