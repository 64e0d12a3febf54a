"""The README's example evaluation report: the tiny 3D model (folds 0 and 1, no TTA, default layer) on a 16x32x32
sample case, with its ground truth as the reference mask.

    python benchmarks/evaluation_example.py

Writes benchmarks/results/evaluation/small_evaluation.json (the sidecar's evaluation) and small_evaluation.png.
"""
import json
import shutil
import tempfile
from pathlib import Path

from nnunetv2_cam_core.cli import main as cli_main
from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder, write_sample_case

FLAGS = ['-f', '0', '1', '--disable-tta', '--target-class', 'lesion', 'organ', '-device', 'cpu', '--evaluate',
         '--eval-steps', '5', '--eval-seeds', '2', '--save-fold-spread']


def main() -> int:
    model = model_folder(build_tiny_models(default_cache()))
    out = Path(__file__).parent / 'results' / 'evaluation'
    with tempfile.TemporaryDirectory() as tmp:
        case = write_sample_case(Path(tmp) / 'input', shape=(16, 32, 32), name='small')
        reference = case.parent / 'labels' / 'small.nii.gz'
        rc = cli_main(['-i', str(case), '-o', f'{tmp}/out', '-m', str(model), *FLAGS, '--reference-mask', str(reference)])
        if rc:
            return rc
        sidecar = json.loads(Path(f'{tmp}/out/small_cam.json').read_text())
        report = {'command': 'benchmarks/evaluation_example.py: ' + ' '.join(FLAGS),
                  'classes': {c: v['evaluation'] for c, v in sidecar['classes'].items()},
                  'evaluation_settings': sidecar['evaluation_settings'], 'timings_s': sidecar['timings_s']}
        (out / 'small_evaluation.json').write_text(json.dumps(report, indent=2))
        shutil.copy(f'{tmp}/out/small_evaluation.png', out / 'small_evaluation.png')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
