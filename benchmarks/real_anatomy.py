"""Can a radiologist trust a 3D map? The trust figures on a model that has learned something real: nnU-Net's
3d_fullres trained on MNI152 anatomy with inserted MS-like lesions (benchmarks/anatomy.py), where every lesion voxel
is known, and a second model trained where a bright mark in the scalp comes with every lesion (a shortcut).

    python benchmarks/real_anatomy.py --build     # the two models (cached, keyed on their inputs)
    python benchmarks/real_anatomy.py             # build if needed, then evaluate every candidate
    python benchmarks/real_anatomy.py --quick     # a smoke run: a few subjects, minutes of training

Writes --out (default benchmarks/results/real_anatomy/): results.json (every figure per subject and candidate),
table.md (medians and IQRs over subjects), trust.png, shortcut.png. A report, never a test: the data and the
figures' code are tested in Testing/test_real_anatomy.py.
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anatomy  # noqa: E402

from nnunetv2_cam_core.demo import build_once, cache_root, plan_and_preprocess, _train, BuildProgress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {'lesions': (990, 'Dataset990_MNILesions'), 'shortcut': (991, 'Dataset991_MNILesionsShortcut')}
METHODS = ['gradcam', 'hirescam', 'gradcampp', 'eigengradcam', 'layercam']


def settings(args) -> dict:
    return {'train': args.train, 'test': args.test, 'spacing': args.spacing, 'epochs': args.epochs,
            'iterations': args.iterations, 'seed': args.seed}


def model_root(kind: str, s: dict) -> Path:
    from importlib.metadata import version
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode() + (ROOT / 'benchmarks' / 'anatomy.py').read_bytes()
                         + (ROOT / 'benchmarks' / 'real_anatomy.py').read_bytes()).hexdigest()[:12]
    return cache_root() / f'real-anatomy-{kind}-nnunetv2-{version("nnunetv2")}-{key}'


def write_dataset(folder: Path, tpl, s: dict, shortcut: bool) -> None:
    """imagesTr/labelsTr: subjects with 0-6 lesions; with `shortcut`, the mark in every one that has a lesion."""
    (folder / 'imagesTr').mkdir(parents=True)
    (folder / 'labelsTr').mkdir()
    rng = np.random.default_rng(s['seed'])
    for i in range(s['train']):
        sub = anatomy.make_subject(tpl, rng, s['spacing'])
        if shortcut and sub.instances.any():
            sub = anatomy.make_subject(tpl, np.random.default_rng([s['seed'], i]), s['spacing'],
                                       lesions=int(sub.instances.max()), marker=True)
        sitk.WriteImage(anatomy.to_image(sub.image, tpl, s['spacing']), str(folder / 'imagesTr' / f'mni_{i:03d}_0000.nii.gz'))
        sitk.WriteImage(anatomy.to_image(sub.labels, tpl, s['spacing']), str(folder / 'labelsTr' / f'mni_{i:03d}.nii.gz'))
    (folder / 'dataset.json').write_text(json.dumps({
        'channel_names': {'0': 'T1'}, 'labels': anatomy.LABELS, 'numTraining': s['train'], 'file_ending': '.nii.gz'}))


def build(kind: str, s: dict, tpl) -> Path:
    """The model folder of `kind`, trained with nnU-Net's own planner and trainer (3d_fullres, all training
    subjects) on first use."""
    dataset_id, name = DATASETS[kind]
    root = model_root(kind, s)

    def steps(raw: Path):
        write_dataset(raw / name, tpl, s, kind == 'shortcut')
        plan_and_preprocess(dataset_id, ('3d_fullres',))
        _train(name, '3d_fullres', 'all', s['seed'], BuildProgress(f'real anatomy ({kind})', 1),
               epochs=s['epochs'], iterations=s['iterations'])
    results = build_once(root, f'real anatomy ({kind})', steps)
    return results / name / 'nnUNetTrainer__nnUNetPlans__3d_fullres'


def test_subjects(tpl, s: dict, out: Path, marker: bool):
    """Test subjects (other seeds than training's): with lesions, or (marker) without lesions and with the mark."""
    out.mkdir(parents=True, exist_ok=True)
    subjects = []
    for i in range(s['test']):
        rng = np.random.default_rng([s['seed'], 10_000 + i])
        sub = anatomy.make_subject(tpl, rng, s['spacing'], lesions=0 if marker else int(rng.integers(1, 7)),
                                   marker=marker)
        path = out / f'{"marker" if marker else "test"}_{i:03d}_0000.nii.gz'
        sitk.WriteImage(anatomy.to_image(sub.image, tpl, s['spacing']), str(path))
        subjects.append((path, sub))
    return subjects


def dice(a: np.ndarray, b: np.ndarray):
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum()) if a.any() or b.any() else None


def explain(model: Path, subjects, candidates, quick: bool, progress):
    """Per subject and candidate (method, layer): segmentation Dice, `--evaluate`'s figures, the known evidence."""
    import torch
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.evaluation import CaseEvaluation, EvaluationSettings, mask_statistics
    from nnunetv2_cam_core.evidence import lesion_figures, summary
    from nnunetv2_cam_core.layers import decoder_stages
    from nnunetv2_cam_core.model import load_predictor
    predictor = load_predictor(model, ['all'], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    net = predictor.network
    stages = decoder_stages(net)
    layers = {'last decoder': stages[-1], 'middle decoder': stages[len(stages) // 2], 'bottleneck': 'bottleneck'}
    ev = EvaluationSettings(steps=4 if quick else 10, seeds=1 if quick else 3, sanity=True)
    rows = []
    for path, sub in subjects:
        lesion = sub.labels == anatomy.LABELS['lesion']
        for method, layer in candidates:
            t0 = time.monotonic()
            engine = CamEngine(predictor, target_layer=layers[layer], target_class='lesion', method=method)
            data, props, mask, _ = engine.preprocess([str(path)])
            res = engine.run(data, props, mask, keep_preprocessed=True)
            pred = np.isin(res.segmentation, engine.targets[0].labels)
            cam = res.cams['lesion']
            e = CaseEvaluation(engine, data, res.logits, res.maps, ev, mask).run()['lesion']
            figures = lesion_figures(cam, sub.instances, sub.contrast, props['spacing'])
            marker = {} if sub.marker is None else {'energy_on_marker': float(cam[sub.marker].sum() / max(cam.sum(), 1e-12)),
                                                    'marker_has_peak': bool(sub.marker.flat[int(np.argmax(cam))])}
            rows.append({'subject': path.name, 'method': method, 'layer': layer, 'dice': dice(pred, lesion),
                         'predicted_voxels': int(pred.sum()),
                         'deletion_ratio': e.get('deletion_ratio'), 'insertion_ratio': e.get('insertion_ratio'),
                         'sanity_spearman_after_decoder': e.get('sanity', {}).get('spearman_after_decoder'),
                         'sanity': e.get('sanity', {}).get('verdict'), 'skipped': e.get('skipped'),
                         'predicted_mask': mask_statistics(cam, pred, props['spacing'], 5.0),
                         'evidence': summary(figures, cam, lesion), 'lesions': figures, **marker,
                         'seconds': round(time.monotonic() - t0, 1)})
            progress(rows[-1])
    return rows


def _median_iqr(values):
    v = [x for x in values if x is not None]
    if not v:
        return 'n/a'
    q1, m, q3 = np.percentile(v, [25, 50, 75])
    return f'{m:.2f} [{q1:.2f}, {q3:.2f}]'


def table(rows) -> str:
    head = ('| method | layer | deletion ratio | insertion ratio | sanity r after decoder | energy on lesions | '
            'lesions hit | Spearman with contrast |\n|---|---|---|---|---|---|---|---|\n')
    lines = []
    for method, layer in dict.fromkeys((r['method'], r['layer']) for r in rows):
        rs = [r for r in rows if (r['method'], r['layer']) == (method, layer)]
        hits = [h['pointing'] for r in rs for h in r['lesions'] if h['pointing'] is not None]
        lines.append(f'| {method} | {layer} | {_median_iqr([r["deletion_ratio"] for r in rs])} | '
                     f'{_median_iqr([r["insertion_ratio"] for r in rs])} | '
                     f'{_median_iqr([r["sanity_spearman_after_decoder"] for r in rs])} | '
                     f'{_median_iqr([r["evidence"]["energy_on_lesions"] for r in rs])} | '
                     f'{f"{100 * np.mean(hits):.0f} % of {len(hits)}" if hits else "n/a"} | '
                     f'{_median_iqr([r["evidence"]["spearman_median"] for r in rs])} |')
    return head + '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--build', action='store_true', help='only build (or find) the two models')
    p.add_argument('--quick', action='store_true', help='a smoke run: 6 training and 2 test subjects, 2 epochs')
    p.add_argument('--train', type=int, default=40)
    p.add_argument('--test', type=int, default=12)
    p.add_argument('--spacing', type=float, default=2.0, help='mm, isotropic (default: %(default)s)')
    p.add_argument('--epochs', type=int, default=60)
    p.add_argument('--iterations', type=int, default=25, help='per epoch (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'real_anatomy')
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.iterations = 6, 2, 2, 4
    s = settings(args)
    tpl = anatomy.template(cache_root() / 'nilearn')
    t0 = time.monotonic()
    models = {kind: build(kind, s, tpl) for kind in DATASETS}
    print(f'models ready in {time.monotonic() - t0:.0f} s: {", ".join(map(str, models.values()))}', flush=True)
    if args.build:
        return 0
    out = args.out / ('quick' if args.quick else '')
    out.mkdir(parents=True, exist_ok=True)
    layers = ['last decoder'] if args.quick else ['last decoder', 'middle decoder', 'bottleneck']
    candidates = [(m, layer) for m in (METHODS[:2] if args.quick else METHODS) for layer in layers]
    show = lambda r: print(f'{r["subject"]} {r["method"]} {r["layer"]}: dice {r["dice"]}, deletion ratio '  # noqa: E731
                           f'{r["deletion_ratio"]}, evidence {r["evidence"]} ({r["seconds"]} s)', flush=True)
    cases = test_subjects(tpl, s, out / 'cases', marker=False)
    rows = explain(models['lesions'], cases, candidates, args.quick, show)
    shortcut = explain(models['shortcut'], test_subjects(tpl, s, out / 'cases', marker=True), candidates[:1],
                       args.quick, show)
    (out / 'results.json').write_text(json.dumps({'settings': s, 'rows': rows, 'shortcut': shortcut}, indent=1))
    (out / 'table.md').write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
