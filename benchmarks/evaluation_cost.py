"""What --evaluate costs against the plain run, on the 75-tile case (10 steps, 3 random seeds, sanity check on).

    python benchmarks/evaluation_cost.py                      # CPU, into results/evaluation/cost.json
    python benchmarks/evaluation_cost.py --device cuda --out results/gpu/evaluation_cost.json

In one process (start-up excluded), tiny 3d_fullres fold 0, no TTA, gradcam at the default layer (the last decoder stage), class
lesion: the plain run over the 75 tiles, then the evaluation of one lesion (`--target-mask`: the predicted lesion
nearest the centre, so the region needs a few tiles), then one re-prediction of the whole class's region (the
lesions are spread over the scan), from which the evaluation of the whole class is extrapolated. Writes --out
and prints a table.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from nnunetv2_cam_core.api import CamEngine
from nnunetv2_cam_core.demo import SPACING, build_tiny_models, default_cache, model_folder, write_sample_case
from nnunetv2_cam_core.evaluation import CaseEvaluation, EvaluationSettings, dilate
from nnunetv2_cam_core.model import load_predictor
from nnunetv2_cam_core.sliding_window import RegionPrediction
from nnunetv2_cam_core.targets import predicted_mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'evaluation' / 'cost.json')
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(2)
    model = model_folder(build_tiny_models(default_cache()))
    with tempfile.TemporaryDirectory() as tmp:
        case = write_sample_case(Path(tmp), seed=11, shape=(40, 144, 144), spacing=SPACING, objects=12, name='large')
        pred = load_predictor(model, [0], 'checkpoint_final.pth', device, use_mirroring=False)
        engine = CamEngine(pred, target_class='lesion')
        data, props, _, _ = engine.preprocess([str(case)])
    if device.type == 'cuda':  # warm up (cuDNN's algorithm search) outside the timings
        engine.run(data, props, keep_preprocessed=True)
    t = time.perf_counter()
    res = engine.run(data, props, keep_preprocessed=True)
    plain = time.perf_counter() - t
    whole = predicted_mask(res.logits, engine.targets, False)[0]
    parts, n = ndimage.label(whole.numpy())
    centre = np.array(whole.shape) / 2
    nearest = min(range(1, n + 1), key=lambda k: np.linalg.norm(np.argwhere(parts == k).mean(0) - centre))
    one = torch.from_numpy(parts == nearest)
    settings = EvaluationSettings()  # 10 steps, 3 seeds, sanity check
    t = time.perf_counter()
    ev = CaseEvaluation(engine, data, res.logits, res.maps, settings, target_mask=one)
    figures = ev.run()['lesion']
    one_lesion = time.perf_counter() - t
    region = torch.from_numpy(dilate(whole.numpy(), ev.sampling, settings.margin_mm))
    predict = RegionPrediction(pred, engine.networks, data, region)
    t = time.perf_counter()
    predict([data] * (2 + settings.seeds))  # one step's variants: the map's deletion and insertion, each seed's
    per_prediction = (time.perf_counter() - t) / (2 + settings.seeds)
    predictions = 2 + (settings.steps - 1) * (2 + settings.seeds)  # both ends, then each step
    rows = {'device': str(device), 'tiles': res.info['tiles'], 'plain_run_s': round(plain, 2),
            'one_lesion': {'region_tiles': figures['region_tiles'], 'evaluate_s': round(one_lesion, 2),
                           'ratio_to_plain': round(one_lesion / plain, 2), 'predictions': ev.done},
            'whole_class': {'region_tiles': len(predict.tiles),
                            'one_prediction_s': round(per_prediction, 2),
                            'curves_s_extrapolated': round(predictions * per_prediction, 1),
                            'ratio_to_plain_extrapolated': round(predictions * per_prediction / plain, 1)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
