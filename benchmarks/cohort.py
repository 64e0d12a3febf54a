"""A cohort of 16 small cases on this machine: one run, against 2 parts at once (-num_parts 2), with torch's
default threads and with one thread per part. Per run: wall time, the time before its first case (imports and
model load: what each part pays again) and the time per case.

    python benchmarks/cohort.py            # writes benchmarks/results/cohort.json

tiny 3d_fullres fold 0, no TTA, gradcam at the default layer, CPU; cases of 20 x 40 x 40 voxels with one object.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder, write_sample_case


def part(model: Path, inputs: Path, out: Path, n: int, i: int, threads=None) -> subprocess.Popen:
    env = {**os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {})}
    return subprocess.Popen([sys.executable, '-m', 'nnunetv2_cam_core', '-i', str(inputs), '-o', str(out), '-m',
                             str(model), '-f', '0', '--disable_tta', '--target-class', 'lesion', '-device', 'cpu',
                             '--progress', 'json', '-num_parts', str(n), '-part_id', str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def timed(model: Path, inputs: Path, out: Path, n: int, threads=None) -> dict:
    t0 = time.perf_counter()
    procs = [part(model, inputs, out, n, i, threads) for i in range(n)]
    first, end = [None] * n, [None] * n

    def follow(i: int) -> None:
        for line in procs[i].stdout:
            e = json.loads(line)
            if first[i] is None and e['event'] == 'stage' and e['stage'] == 'preprocess':
                first[i] = time.perf_counter() - t0
        assert procs[i].wait() == 0
        end[i] = time.perf_counter() - t0
    readers = [threading.Thread(target=follow, args=(i,)) for i in range(n)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    assert len(list(out.glob('*_cam.json'))) == 16
    return {'parts': n, 'threads_per_part': threads or 'torch default', 'wall_s': round(max(end), 1),
            'before_first_case_s': [round(f, 1) for f in first],
            'seconds_per_case_in_a_part': [round((e - f) / (16 / n), 2) for e, f in zip(end, first)],
            'cases_per_minute': round(16 / max(end) * 60, 1)}


def main() -> int:
    model = model_folder(build_tiny_models(default_cache()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / 'in'
        for s in range(16):
            write_sample_case(inputs, seed=200 + s, shape=(20, 40, 40), spacing=(1.0, 1.0, 1.8), objects=1,
                              name=f'case{s:03d}')
        for k, (n, threads) in enumerate(((1, None), (2, None), (2, 1))):
            rows.append(timed(model, inputs, Path(tmp) / f'out{k}', n, threads))
            print(rows[-1], flush=True)
    result = {'cases': 16, 'cpu_cores': os.cpu_count(), 'rows': rows}
    (Path(__file__).parent / 'results' / 'cohort.json').write_text(json.dumps(result, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
