"""Tiling invariance per method, pooling and layer: how much a map changes when only the tile layout does.

    python benchmarks/tiling_invariance.py                 # the tiny models of NNUNETCAM_TINY_SEED (default 0)
    NNUNETCAM_TINY_SEED=1 python benchmarks/tiling_invariance.py

Pearson r of the raw CAM inside the dilated predicted lesion between -step_size 0.5 and 0.33, 3d_fullres fold 0,
no TTA, on the 75-tile case of Testing/test_stitching.py. Which pooling wins depends on how a tiny model trained,
so this is a report (one JSON per build in --out and a table on stdout), never a test.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from nnunetv2_cam_core.api import CamEngine
from nnunetv2_cam_core.demo import SPACING, build_seed, build_tiny_models, default_cache, model_folder, \
    write_sample_case
from nnunetv2_cam_core.methods import get_method
from nnunetv2_cam_core.model import fold_networks, load_predictor
from nnunetv2_cam_core.sliding_window import CamSpec, sliding_window_cam
from nnunetv2_cam_core.targets import predicted_mask

ROWS = [('gradcam', 'tile', 'bottleneck'), ('gradcam', 'volume', 'bottleneck'),
        ('eigengradcam', 'tile', 'bottleneck'), ('eigengradcam', 'volume', 'bottleneck'),
        ('hirescam', None, 'bottleneck'), ('gradcam', 'tile', 'last_decoder'), ('hirescam', None, 'last_decoder')]


def invariance(pred, net, data, engine, method, pooling, layer) -> float:
    maps = []
    for step in (0.5, 0.33):
        pred.tile_step_size = step
        layers = [engine.layers[0] if layer == 'bottleneck' else f'decoder.stages.{len(net.decoder.stages) - 1}']
        out = sliding_window_cam(pred, [net], data, CamSpec(get_method(method), layers, engine.targets, pooling))
        maps.append(out.cams[0, 0].numpy())
    region = ndimage.binary_dilation(predicted_mask(out.logits, engine.targets, False)[0].numpy(), iterations=2)
    return float(np.corrcoef(maps[0][region], maps[1][region])[0, 1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'tiling')
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model = model_folder(build_tiny_models(default_cache()))
    with tempfile.TemporaryDirectory() as tmp:
        case = write_sample_case(Path(tmp), seed=11, shape=(40, 144, 144), spacing=SPACING, objects=12, name='large')
        pred = load_predictor(model, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
        engine = CamEngine(pred, target_class='lesion')
        data = engine.preprocess([str(case)])[0]
    net = fold_networks(pred)[0]
    rows = [{'method': m, 'pooling': pool or 'element-wise', 'layer': layer,
             'r': round(invariance(pred, net, data, engine, m, pool, layer), 4)} for m, pool, layer in ROWS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'seed{build_seed()}.json').write_text(json.dumps(rows, indent=2))
    print(f'| method | pooling | layer | r (seed {build_seed()}) |\n| --- | --- | --- | --- |')
    for r in rows:
        print(f'| {r["method"]} | {r["pooling"]} | {r["layer"]} | {r["r"]} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
