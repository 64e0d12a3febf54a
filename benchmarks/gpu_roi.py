"""With a GPU: an ROI re-explained through the server on the CT-sized case of benchmarks/gpu_ct.py (6-stage
PlainConvUNet, 256^3, patch 128^3, 27 tiles). The issue's goal: <= 2 s on a cached case.

    python benchmarks/gpu_roi.py --out benchmarks/results/gpu
    python benchmarks/gpu_roi.py --size 96 --patch 64 --device cpu --out /tmp/roi   # a smoke run without a GPU

First explanation (model load, preprocessing, every tile), then a 21^3 box around a predicted voxel that lies in one
cell of the tile grid (8 tiles), twice, with gradcam at the default layer, fold 0, no TTA. Writes gpu_roi.json.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from gpu_ct import LABELS, build_case, build_model, case_parser  # noqa: E402
from server import start, timed  # noqa: E402


def main(argv=None) -> int:
    ap = case_parser(__doc__.splitlines()[0])
    ap.add_argument('--cache-mb', default='8192', help='the server\'s cache; the default holds every tile\'s '
                    'layer outputs in float16 (CUDA autocast), float32 on the CPU needs twice that')
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / 'models' / 'Dataset988_CTBench' / 'nnUNetTrainer__nnUNetPlans__3d_fullres',
                            args.patch, folds=(0,))
        case = build_case(work / 'case', args.size)
        # room for every tile's layer outputs (27 x 128 MiB in float16): the ROI's tiles run no forward pass
        server, client = start(work / 'models', work, '--cache-mb', args.cache_mb, device=args.device)
        model_id = str(model.relative_to(work / 'models'))
        try:
            t = time.perf_counter()
            case_id = client.upload([str(case)])
            upload_s = time.perf_counter() - t
            first = timed(client, model_id, case_id, classes=['tumor'])
            # the stitched segmentation of the cached case: pick a foreground voxel inside one cell of the tile grid
            # (starts 0, patch/2, ...), so that a box around it overlaps 2 tiles per axis
            job = client.wait(client.explain(model_id, case_id, folds=[0], tta=False, classes=['tumor']))
            seg_name = next(n for n in job['files'] if n == 'bench.nii.gz')
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(client.download(job['id'], work / 'seg', [seg_name])[seg_name])))
            h, r = args.patch // 2, 10
            cell = np.zeros_like(seg, bool)
            cell[h + r:2 * h - r, h + r:2 * h - r, h + r:2 * h - r] = True
            fg = (seg > 0) & cell
            if not fg.any():
                fg = cell
            z, y, x = (int(v[len(v) // 2]) for v in np.nonzero(fg))
            label = int(seg[z, y, x]) or LABELS['tumor']
            name = next(k for k, v in LABELS.items() if v == label)
            box = {'kind': 'box', 'box': [[x - r, y - r, z - r], [x + r, y + r, z + r]]}
            roi = [timed(client, model_id, case_id, classes=[name], region=box) for _ in range(2)]
        finally:
            server.terminate()
            server.wait(30)
    rows = {'device': args.device, 'case': f'{args.size}^3, patch {args.patch}^3', 'upload_s': round(upload_s, 2),
            'first_explanation_s': first[0], 'first_tiles': first[1], 'first_timings_s': first[2],
            'roi_class': name, 'roi_box_voxels': box['box'], 'roi_s': [r[0] for r in roi], 'roi_tiles': roi[0][1],
            'roi_timings_s': [r[2] for r in roi],
            'roi_forwards_from_layer_cache': [r[3] for r in roi], 'goal_s': 2.0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'gpu_roi.json').write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
