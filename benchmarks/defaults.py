"""Which layer, pooling and method to default to: every candidate on several models and cases, cases made unlike the
training data included, by the figures that say whether a map can be trusted.

    python benchmarks/defaults.py            # the tiny models of NNUNETCAM_TINY_SEED (default 0); ~80 min on 2 cores

Models: the tiny 3d_fullres (fold 0) and 2d models and the region-based (sigmoid) 3D model. Cases per model: one as
trained, one resampled to other spacing (objects of other sizes in voxels, more anisotropic), one with the in-plane
axes swapped and flipped (objects where training never put them). Per case and candidate:
- deletion and insertion AUC ratios to a random ranking (`--evaluate`'s, 4 steps, 1 seed, no TTA);
- tiling invariance: Pearson r between the maps at -step_size 0.5 and 0.33 (none where both steps give the same
  tiles);
- untiled r: Pearson r between the tiled map and the map of the whole case in one forward (no tiling at all).
All r inside the class's region (predicted mask dilated by 5 mm). The table gives medians per configuration kind
(2D, 3D); one JSON per build in --out keeps every figure. A report, never a test.
"""
import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunetv2_cam_core.api import CamEngine
from nnunetv2_cam_core.demo import build_seed, build_tiny_models, default_cache, model_folder, write_sample_case
from nnunetv2_cam_core.evaluation import CaseEvaluation, EvaluationSettings
from nnunetv2_cam_core.labels import output_classes
from nnunetv2_cam_core.model import load_predictor
from nnunetv2_cam_core.sliding_window import CamSpec, combine_layers, sliding_window_cam

CANDIDATES = [('gradcam', 'tile', 'bottleneck'), ('gradcam', 'tile', 'last_decoder'),
              ('hirescam', None, 'last_decoder'), ('eigengradcam', 'volume', 'bottleneck')]


def case_variants(path: Path, out: Path) -> dict:
    """'as trained', 'other spacing' (resampled: 0.8x in-plane, 1.6x through-plane voxel size), 'axes swapped'."""
    img = sitk.ReadImage(str(path))
    stem = path.name.replace('_0000.nii.gz', '')
    cases = {'as trained': path}
    spacing = [s * f for s, f in zip(img.GetSpacing(), (0.8, 0.8, 1.6))]
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    resampled = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                              img.GetDirection(), 0.0, img.GetPixelID())
    cases['other spacing'] = out / f'{stem}_spacing_0000.nii.gz'
    sitk.WriteImage(resampled, str(cases['other spacing']))
    arr = sitk.GetArrayFromImage(img).transpose(0, 2, 1)[:, ::-1]
    swapped = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    swapped.CopyInformation(img) if arr.shape == sitk.GetArrayFromImage(img).shape else swapped.SetSpacing(
        img.GetSpacing())
    cases['axes swapped'] = out / f'{stem}_swapped_0000.nii.gz'
    sitk.WriteImage(swapped, str(cases['axes swapped']))
    return cases


def untiled(pred, nets, data, spec):
    """The map with no tiling at all: one tile over the whole (padded) case."""
    cm = pred.configuration_manager
    patch = list(cm.patch_size)
    strides = np.prod(np.array(cm.pool_op_kernel_sizes), 0)
    cm.configuration['patch_size'] = [int(math.ceil(s / d) * d) for s, d in zip(data.shape[1:], strides)] \
        if len(patch) == 3 else [int(math.ceil(s / d) * d) for s, d in zip(data.shape[2:], strides)]
    try:
        return combine_layers(sliding_window_cam(pred, nets, data, spec).cams)[0]
    finally:
        cm.configuration['patch_size'] = patch


def pearson(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor):
    x, y = a[region].double().numpy(), b[region].double().numpy()
    return None if np.ptp(x) == 0 or np.ptp(y) == 0 else round(float(np.corrcoef(x, y)[0, 1]), 4)


def _rounded(x):
    return None if x is None else round(x, 4)  # None: the baseline does not lower the score (cannot rank)


def measure(model: Path, target: str, case: Path) -> list:
    pred = load_predictor(model, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    rows = []
    for method, pooling, layer in CANDIDATES:
        engine = CamEngine(pred, layer, [target], method, pooling)
        data, props, _, _ = engine.preprocess([str(case)])
        spec = CamSpec(engine.method, engine.layers, engine.targets, engine.pooling)
        maps, tiles = {}, {}
        for step in (0.5, 0.33):
            pred.tile_step_size = step
            out = sliding_window_cam(pred, engine.networks, data, spec)
            tiles[step] = out.n_tiles
            maps[step] = combine_layers(out.cams)[0]
            if step == 0.5:
                logits = out.logits
        pred.tile_step_size = 0.5
        ev = CaseEvaluation(engine, data, logits, maps[0.5][None], EvaluationSettings(steps=4, seeds=1, sanity=False))
        plan = ev.plan()[target]
        if 'skipped' in plan:
            rows.append({'method': method, 'pooling': pooling or 'element-wise', 'layer': layer,
                         'skipped': plan['skipped']})
            continue
        region = plan['region']
        curves = ev.curves(engine.targets[0], 0, region, plan['predict'])
        rows.append({'method': method, 'pooling': pooling or 'element-wise', 'layer': layer,
                     'deletion_ratio': _rounded(curves['deletion_ratio']),
                     'insertion_ratio': _rounded(curves['insertion_ratio']),
                     'tiles': tiles[0.5],
                     # the same tiles at both steps (a case barely larger than the patch) say nothing
                     'tiling_r': pearson(maps[0.5], maps[0.33], region) if tiles[0.5] != tiles[0.33] else None,
                     'untiled_r': pearson(maps[0.5], untiled(pred, engine.networks, data, spec), region)})
    return rows


def main(argv=None) -> int:
    from nnunetv2_cam_core.model_kinds import build_kind, write_kind_case
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'defaults')
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = build_tiny_models(default_cache())
    regions = build_kind('regions')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = write_sample_case(tmp / 'main', seed=31, shape=(40, 96, 96), spacing=(0.9, 0.9, 2.0), objects=2,
                                 name='bench')
        kidney = write_kind_case('regions', tmp / 'regions', seed=77, name='bench')
        region_case = next(kidney.glob('*_0000.nii.gz'))
        region_target = next(iter(output_classes(json.loads((regions / 'dataset.json').read_text()))))
        plan = [('3D', '3d_fullres', model_folder(results, '3d_fullres'), 'lesion', base),
                ('2D', '2d', model_folder(results, '2d'), 'lesion', base),
                ('3D', '3d_fullres regions', regions, region_target, region_case)]
        for kind, name, model, target, case in plan:
            for variant, path in case_variants(case, case.parent).items():
                for row in measure(model, target, path):
                    rows.append({'kind': kind, 'model': name, 'case': variant, **row})
                    print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'seed{build_seed()}.json').write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


def table(rows: list) -> str:
    """Medians over models and cases, per configuration kind and candidate."""
    lines = ['| kind | method | pooling | layer | deletion ratio (lower: better) | insertion ratio (higher: better) '
             '| tiling r | untiled r | cases |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for kind in ('2D', '3D'):
        for method, pooling, layer in CANDIDATES:
            sel = [r for r in rows if r['kind'] == kind and r['method'] == method and r['layer'] == layer
                   and r['pooling'] == (pooling or 'element-wise') and 'skipped' not in r]

            def med(key):
                vals = [r[key] for r in sel if r.get(key) is not None]
                return f'{np.median(vals):.2f}' if vals else 'n/a'
            lines.append(f'| {kind} | {method} | {pooling or "element-wise"} | {layer} | {med("deletion_ratio")} | '
                         f'{med("insertion_ratio")} | {med("tiling_r")} | {med("untiled_r")} | {len(sel)} |')
    return '\n'.join(lines)


if __name__ == '__main__':
    raise SystemExit(main())
