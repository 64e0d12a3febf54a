"""Tiny models of the other kinds nnU-Net trains, each its own synthetic dataset, planned and trained by nnU-Net
and cached next to the main tiny models: `regions` (KiTS-like overlapping regions, sigmoid outputs),
`multichannel` (two MRI-like channels, each showing one class, with an ignore label), `resenc` (a trained
residual-encoder U-Net) and `png` (natural images, RGB in one file). `python -m nnunetv2_cam_core.model_kinds KIND ...` builds them."""
import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Dict

import numpy as np

from .demo import BuildProgress, _train, build_once, build_seed, cache_root, plan_and_preprocess

KIND_VERSION = 2  # bump when a kind's data or recipe changes
SPACING = (1.1, 1.1, 1.6)  # x, y, z
SHAPE = (16, 32, 32)       # z, y, x


def _ball(shape, center, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1


def _write_nifti(arr: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin((12.0, -7.5, 30.0))
    sitk.WriteImage(img, str(path))


def regions_case(rng: np.random.Generator, shape=SHAPE):
    """A 'kidney' (label 1) holding a bright 'tumor' (2) and a dark 'cyst' (3): regions kidney = {1, 2, 3},
    masses = {2, 3}, tumor = {2}, nested and overlapping as in KiTS23."""
    img = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    c = [s / 2 + rng.uniform(-2, 2) for s in shape]
    kidney = _ball(shape, c, (shape[0] * 0.32, shape[1] * 0.33, shape[2] * 0.36))
    lab[kidney] = 1
    side = 1 if rng.random() < 0.5 else -1
    tumor = _ball(shape, (c[0], c[1], c[2] + side * shape[2] * 0.16), (2.6, 3.2, 3.2)) & kidney
    cyst = _ball(shape, (c[0], c[1], c[2] - side * shape[2] * 0.16), (2.2, 2.8, 2.8)) & kidney
    lab[tumor], lab[cyst] = 2, 3
    img[lab == 1] += 90
    img[lab == 2] += 260
    img[lab == 3] -= 60
    return img, lab


def multichannel_case(rng: np.random.Generator, shape=SHAPE):
    """'T1' shows only the dark 'cyst' (2), 'T2' only the bright 'lesion' (1); the other channel is noise there."""
    t1 = rng.normal(100, 10, shape).astype(np.float32)
    t2 = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    half = shape[2] // 2
    first = rng.random() < 0.5
    for value, (lo, hi) in ((1, (2, half - 2) if first else (half + 2, shape[2] - 2)),
                            (2, (half + 2, shape[2] - 2) if first else (2, half - 2))):
        c = (rng.uniform(5, shape[0] - 5), rng.uniform(8, shape[1] - 8), rng.uniform(lo + 5, hi - 5))
        lab[_ball(shape, c, (3.0, 4.5, 4.5))] = value
    t2[lab == 1] += 200
    t1[lab == 2] -= 70
    return np.stack([t1, t2]), lab


def sparse_annotation(lab: np.ndarray, ignore: int) -> np.ndarray:
    """nnU-Net's sparse annotation: only every third z slice annotated, the rest the ignore label."""
    out = np.full_like(lab, ignore)
    out[::3] = lab[::3]
    return out


def png_case(rng: np.random.Generator, size: int = 64):
    """An RGB picture: a red disk ('red', 1) and a blue square ('blue', 2) on a grey textured background."""
    rgb = np.clip(rng.normal(110, 18, (size, size, 3)), 0, 255)
    lab = np.zeros((size, size), np.uint8)
    c = rng.uniform(14, size - 14, 2)
    disk = _ball((size, size), c, (rng.uniform(6, 9),) * 2)
    for _ in range(20):
        q = rng.integers(6, size - 6, 2)
        if np.hypot(*(q - c)) > 17:
            break
    h = int(rng.integers(4, 7))
    lab[q[0] - h:q[0] + h, q[1] - h:q[1] + h] = 2
    lab[disk] = 1
    rgb[lab == 1] = (210, 40, 40) + rng.normal(0, 12, ((lab == 1).sum(), 3))
    rgb[lab == 2] = (40, 60, 200) + rng.normal(0, 12, ((lab == 2).sum(), 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), lab


KINDS: Dict[str, dict] = {
    'regions': {'id': 981, 'name': 'Dataset981_TinyRegions', 'configuration': '3d_fullres', 'epochs': 8,
                'dataset': {'channel_names': {'0': 'CT'},
                            'labels': {'background': 0, 'kidney': [1, 2, 3], 'masses': [2, 3], 'tumor': 2},
                            'regions_class_order': [1, 3, 2], 'file_ending': '.nii.gz'}},
    'multichannel': {'id': 982, 'name': 'Dataset982_TinyTwoChannels', 'configuration': '3d_fullres', 'epochs': 6,
                     'dataset': {'channel_names': {'0': 'T1', '1': 'T2'},
                                 'labels': {'background': 0, 'lesion': 1, 'cyst': 2, 'ignore': 3},
                                 'file_ending': '.nii.gz'}},
    # a residual-encoder U-Net (nnU-Net's ResEnc M planner), trained a few steps: its blocks add the residual in
    # place, and before any training their conv2 outputs are all zero (the last norm starts at 0)
    'resenc': {'id': 984, 'name': 'Dataset984_TinyResEnc', 'configuration': '3d_fullres', 'epochs': 1, 'iterations': 3,
               'planner': 'nnUNetPlannerResEncM', 'plans': 'nnUNetResEncUNetMPlans',
               'dataset': {'channel_names': {'0': 'CT'},
                           'labels': {'background': 0, 'kidney': 1, 'tumor': 2, 'cyst': 3},
                           'file_ending': '.nii.gz'}},
    # 3d_lowres -> 3d_cascade_fullres, forced on small data by a plan with a low-resolution stage at twice the spacing
    'cascade': {'id': 985, 'name': 'Dataset985_TinyCascade', 'configuration': '3d_cascade_fullres', 'epochs': 5,
                'shape': (20, 40, 40),
                'dataset': {'channel_names': {'0': 'CT'},
                            'labels': {'background': 0, 'kidney': 1, 'tumor': 2, 'cyst': 3},
                            'file_ending': '.nii.gz'}},
    'png': {'id': 983, 'name': 'Dataset983_TinyPNG', 'configuration': '2d', 'epochs': 12,
            'dataset': {'channel_names': {'0': 'R', '1': 'G', '2': 'B'},
                        'labels': {'background': 0, 'red': 1, 'blue': 2}, 'file_ending': '.png'}},
}


def _write_cases(kind: str, images: Path, labels: Path, rng: np.random.Generator, n: int, prefix: str = 'case',
                 sparse: bool = False):
    """n cases of `kind` in nnU-Net naming; `sparse`: labels as the ignore-label model was trained with."""
    from PIL import Image
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        case = f'{prefix}_{i:03d}' if n > 1 else prefix
        if kind == 'png':
            rgb, lab = png_case(rng)
            Image.fromarray(rgb).save(images / f'{case}_0000.png')
            Image.fromarray(lab).save(labels / f'{case}.png')
            continue
        if kind in ('regions', 'resenc', 'cascade'):
            img, lab = regions_case(rng, KINDS[kind].get('shape', SHAPE))
            channels = [img]
        else:
            chans, lab = multichannel_case(rng)
            channels = list(chans)
            if sparse:
                lab = sparse_annotation(lab, KINDS[kind]['dataset']['labels']['ignore'])
        for c, arr in enumerate(channels):
            _write_nifti(arr, images / f'{case}_{c:04d}.nii.gz')
        _write_nifti(lab, labels / f'{case}.nii.gz')


def _cascade(spec: dict, seed: int) -> None:
    """nnU-Net's plan plus a 3d_lowres stage (twice the spacing, half the patch where the network's strides
    allow) and a 3d_cascade_fullres stage after it; the low-resolution stage trains on every case (fold 'all'), and
    its own validation writes the segmentations the cascade stage trains on, as `nnUNetv2_train` does."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.run.run_training import get_trainer_from_args
    import torch
    extract_fingerprints([spec['id']], num_processes=1, check_dataset_integrity=True)
    plan_experiments([spec['id']])
    plans_file = Path(os.environ['nnUNet_preprocessed']) / spec['name'] / 'nnUNetPlans.json'
    plans = json.loads(plans_file.read_text())
    full = plans['configurations']['3d_fullres']
    steps = np.prod(np.array(full['architecture']['arch_kwargs']['strides']), axis=0)
    plans['configurations']['3d_lowres'] = {
        'inherits_from': '3d_fullres', 'data_identifier': 'nnUNetPlans_3d_lowres',
        'spacing': [2 * x for x in full['spacing']],
        'median_image_size_in_voxels': [max(1, round(m / 2)) for m in full['median_image_size_in_voxels']],
        'patch_size': [int(max(st, p // 2 // st * st)) for p, st in zip(full['patch_size'], steps)],
        'next_stage': '3d_cascade_fullres'}
    plans['configurations']['3d_cascade_fullres'] = {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'}
    plans_file.write_text(json.dumps(plans, indent=1))
    preprocess([spec['id']], configurations=('3d_fullres', '3d_lowres'), num_processes=(1, 1),
               show_progress_bar=False)
    progress = BuildProgress('tiny cascade models', 2)
    _train(spec['name'], '3d_lowres', 'all', seed, progress, epochs=spec['epochs'] + 3)
    lowres = get_trainer_from_args(spec['name'], '3d_lowres', 'all', device=torch.device('cpu'))
    lowres.initialize()
    lowres.load_checkpoint(str(Path(lowres.output_folder) / 'checkpoint_final.pth'))
    lowres.perform_actual_validation(False)  # also writes predicted_next_stage/3d_cascade_fullres
    _train(spec['name'], '3d_cascade_fullres', 0, seed + 1, progress, epochs=spec['epochs'])


def kind_root(kind: str) -> Path:
    return cache_root() / f'tiny-{kind}-nnunetv2-{version("nnunetv2")}-v{KIND_VERSION}-seed{build_seed()}'


def build_kind(kind: str, n_train: int = 6) -> Path:
    """The kind's model folder (TRAINER__PLANS__CONFIGURATION), built and cached on first use."""
    spec = KINDS[kind]
    seed = build_seed() + spec['id']

    def steps(raw: Path):
        folder = raw / spec['name']
        _write_cases(kind, folder / 'imagesTr', folder / 'labelsTr', np.random.default_rng(seed), n_train,
                     sparse=True)
        (folder / 'dataset.json').write_text(json.dumps({**spec['dataset'], 'numTraining': n_train}, indent=1))
        if kind == 'cascade':
            _cascade(spec, seed)
            return
        plan_and_preprocess(spec['id'], (spec['configuration'],), (spec.get('planner', 'ExperimentPlanner'),), plans)
        _train(spec['name'], spec['configuration'], 0, seed, BuildProgress(f'tiny {kind} model', 1),
               epochs=spec['epochs'], iterations=spec.get('iterations', 12), plans_identifier=plans)
    plans = spec.get('plans', 'nnUNetPlans')
    results = build_once(kind_root(kind), f'tiny {kind} model', steps)
    return results / spec['name'] / f'nnUNetTrainer__{plans}__{spec["configuration"]}'


def write_kind_case(kind: str, folder: Path, seed: int = 321, name: str = 'case') -> Path:
    """One test case of `kind`: its image file(s) in `folder` in nnU-Net naming, its full label in folder/labels/."""
    _write_cases(kind, folder, folder / 'labels', np.random.default_rng(seed), 1, prefix=name)
    return folder


def main(argv=None) -> int:
    # nnU-Net's validation (the cascade's low-resolution stage) exports through a spawned pool: one worker, not 8
    os.environ.setdefault('nnUNet_def_n_proc', '1')
    p = argparse.ArgumentParser(description='Build (or find) the tiny models of other kinds; prints their folders.')
    p.add_argument('kinds', nargs='*', metavar='KIND', help=f'any of {", ".join(KINDS)} (default: all)')
    args = p.parse_args(argv)
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        p.error(f'unknown kind {unknown[0]}; choose from {", ".join(KINDS)}')
    for kind in args.kinds or list(KINDS):
        print(build_kind(kind))
    return 0


if __name__ == '__main__':
    sys.exit(main())
