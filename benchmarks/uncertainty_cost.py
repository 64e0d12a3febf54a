"""What --save-uncertainty costs against the same run without it, on the tiny 3D sample case.

    python benchmarks/uncertainty_cost.py                  # CPU, into results/cpu/uncertainty_cost.json
    python benchmarks/uncertainty_cost.py --device cuda --tta --out results/gpu/uncertainty_cost.json

In one process (start-up excluded): tiny 3d_fullres, folds 0 1 (with --tta also mirrored), gradcam at the last decoder
stage, classes lesion and organ; the whole case as the CLI writes it (`run_cases`: sliding window, export, files),
without and with the uncertainty maps, alternating, best of --repeats each. Also the extra memory the stitched terms
take (float32 volumes of the padded case). Writes --out and prints it.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nnunetv2_cam_core.api import CamEngine, run_cases
from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder, write_sample_case
from nnunetv2_cam_core.model import load_predictor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--tta', action='store_true')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'cpu' / 'uncertainty_cost.json')
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(2)
    model = model_folder(build_tiny_models(default_cache()))
    pred = load_predictor(model, [0, 1], 'checkpoint_final.pth', device, use_mirroring=args.tta)
    engines = {on: CamEngine(pred, target_class=['lesion', 'organ'], uncertainty=on) for on in (False, True)}
    best = {False: float('inf'), True: float('inf')}
    with tempfile.TemporaryDirectory() as tmp:
        case = write_sample_case(Path(tmp))
        for i in range(args.repeats + (device.type == 'cuda')):  # CUDA: one warm-up round, not counted
            for on, engine in engines.items():
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                t = time.perf_counter()
                run_cases(engine, [str(case)], Path(tmp) / f'out{on}', overwrite=True, keep_results=False)
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                if i or device.type != 'cuda':
                    best[on] = min(best[on], time.perf_counter() - t)
        data, _, _, _ = engines[True].preprocess([str(case)])
    patch = pred.configuration_manager.patch_size
    padded = [max(int(s), int(p)) for s, p in zip(data.shape[1:], patch)]
    heads, explained = pred.label_manager.num_segmentation_heads, 2
    volumes = heads + 1 + explained
    row = {'device': str(device), 'folds': [0, 1], 'tta': args.tta, 'repeats': args.repeats,
           'without_s': round(best[False], 3), 'with_s': round(best[True], 3),
           'ratio': round(best[True] / best[False], 3),
           'extra_memory_mb': round(volumes * 4 * torch.Size(padded).numel() / 2 ** 20, 2),
           'extra_volumes': volumes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
