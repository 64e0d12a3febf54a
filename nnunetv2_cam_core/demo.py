"""Tiny synthetic nnU-Net models for the demo and the tests, trained with nnU-Net's own planner and trainer.

`python -m nnunetv2_cam_core.demo` builds them once (cached, keyed on the nnunetv2 version), then writes the
segmentation, CAMs, PNG overlays and sidecar for a sample case and prints where they are.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np

DATASET_ID = 987
DATASET_NAME = f'Dataset{DATASET_ID:03d}_TinyCAM'
LABELS = {'background': 0, 'lesion': 1, 'organ': 2}
RESENC_PLANS = 'nnUNetResEncUNetMPlans'
BUILD_VERSION = 7  # bump when the synthetic data or training recipe changes
# anisotropic, rotated, offset: geometry that exposes any axis or direction mix-up
SPACING = (0.9, 0.9, 2.0)
DIRECTION = (0.9396926, -0.3420201, 0.0, 0.3420201, 0.9396926, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (-31.5, 12.25, 40.0)


def build_seed() -> int:
    """NNUNETCAM_TINY_SEED (default 0) seeds the synthetic data and the training: another seed, other models."""
    return int(os.environ.get('NNUNETCAM_TINY_SEED', '0'))


def cache_root() -> Path:
    """NNUNETCAM_MODEL_CACHE, else NNUNETCAM_CACHE (which also holds the venv), else ~/.cache/nnunetcam."""
    return Path(os.environ.get('NNUNETCAM_MODEL_CACHE') or os.environ.get(
        'NNUNETCAM_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'nnunetcam')))


def default_cache() -> Path:
    return cache_root() / f'tiny-models-nnunetv2-{version("nnunetv2")}-v{BUILD_VERSION}-seed{build_seed()}'


def _seed_everything(seed: int) -> None:
    """Python, numpy and torch generators (nnU-Net's sampling and augmentation draw from the global ones), and
    torch's deterministic kernels where it has them."""
    import random
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def synthetic_case(rng: np.random.Generator, shape=(20, 40, 40), spacing=SPACING, objects: int = 1,
                   border: int = 2, contrast: float = 1.0):
    """Image (z, y, x) with bright spheres (lesion) and boxes (organ) on noise, zero border so nnU-Net crops.
    `contrast` < 1 dims the objects against the background (a shifted domain)."""
    import SimpleITK as sitk
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1).astype(np.float32)
    mm = grid * np.array(spacing[::-1], np.float32)
    img = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    inner = [(border + 2, s - border - 2) for s in shape]
    for k in range(objects):
        # lesion spheres in the left half of x, organ boxes in the right half
        lo_x, hi_x = inner[2]
        mid = (lo_x + hi_x) // 2
        c = [rng.uniform(a + 3, b - 3) for a, b in inner[:2]] + [rng.uniform(lo_x + 3, mid - 3)]
        r = rng.uniform(4.5, 7.0)
        d = np.linalg.norm(mm - np.array(c, np.float32) * np.array(spacing[::-1], np.float32), axis=-1)
        lab[d < r] = 1
        half = [rng.integers(2, 4), rng.integers(3, 6), rng.integers(3, 6)]
        cb = [int(rng.integers(a + h, b - h)) for (a, b), h in zip(inner[:2], half[:2])] + \
             [int(rng.integers(mid + half[2], hi_x - half[2]))]
        lab[tuple(slice(cc - h, cc + h) for cc, h in zip(cb, half))] = 2
    # lesion brighter, organ darker than the background: the background lies inside the foreground intensity
    # range, so nnU-Net's CT normalisation (clipped to foreground percentiles) keeps all three apart
    img[lab == 1] += 220 * contrast
    img[lab == 2] -= 90 * contrast
    img += 50
    for ax in range(3):
        sl = [slice(None)] * 3
        sl[ax] = slice(0, border)
        img[tuple(sl)] = 0
        lab[tuple(sl)] = 0
        sl[ax] = slice(shape[ax] - border, None)
        img[tuple(sl)] = 0
        lab[tuple(sl)] = 0
    out = []
    for arr in (img, lab):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(spacing)
        im.SetDirection(DIRECTION)
        im.SetOrigin(ORIGIN)
        out.append(im)
    return out[0], out[1]


def write_sample_case(folder: Path, seed: int = 123, shape=(36, 72, 72), spacing=(0.95, 0.95, 2.1),
                      name: str = 'sample', objects: int = 3, contrast: float = 1.0) -> Path:
    """A test case larger than the patch (several tiles) with spacing unlike the plan's (so resampling happens).
    Its ground truth goes to folder/labels/."""
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    img, lab = synthetic_case(np.random.default_rng(seed), shape, spacing, objects=objects, contrast=contrast)
    path = folder / f'{name}_0000.nii.gz'
    sitk.WriteImage(img, str(path))
    (folder / 'labels').mkdir(exist_ok=True)
    sitk.WriteImage(lab, str(folder / 'labels' / f'{name}.nii.gz'))
    return path


class BuildProgress:
    """One line per model on the terminal, with the time left; nnU-Net's own output goes to the build log."""

    def __init__(self, label: str, models: int, stream=None):
        self.label, self.models, self.n = label, models, 0
        self.stream = stream or sys.__stderr__  # the terminal: nnU-Net's own output goes to the build log
        self.live = self.stream.isatty()

    def start(self, name: str) -> Callable[[int, int, float], None]:
        self.n += 1
        head = f'{self.label}: model {self.n}/{self.models} ({name})'
        if not self.live:
            print(f'{head}: training', file=self.stream, flush=True)

        def epoch(done: int, total: int, elapsed: float):
            left = elapsed / done * (total - done)
            if done == total:
                print(f'\r{head}: trained in {elapsed:.0f} s'.ljust(78), file=self.stream, flush=True)
            elif self.live:
                print(f'\r{head}: epoch {done}/{total}, about {left:.0f} s left'.ljust(78), end='',
                      file=self.stream, flush=True)
        return epoch


def _train(dataset: str, configuration: str, fold, seed: int, progress: BuildProgress, epochs: int = 12,
           iterations: int = 12, **kwargs):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    os.environ['nnUNet_n_proc_DA'] = '0'  # augment in-process: no worker pool on a 2-core machine
    _seed_everything(seed)
    trainer = get_trainer_from_args(dataset, configuration, fold, device=torch.device('cpu'), **kwargs)
    # nnU-Net's own trainer, just far fewer iterations
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 2
    report, end_epoch, t0 = progress.start(f'{configuration} fold {fold}'), trainer.on_epoch_end, time.monotonic()

    def on_epoch_end():
        end_epoch()
        report(trainer.current_epoch, epochs, time.monotonic() - t0)
    trainer.on_epoch_end = on_epoch_end
    trainer.run_training()


def build_once(root: Path, label: str, steps: Callable[[Path], None]) -> Path:
    """`steps(raw_dataset_root)` writes a dataset and plans, preprocesses and trains it with nnU-Net in a temporary
    folder; its nnUNet_results become root/nnUNet_results, marked root/BUILT. Nothing half-built is left behind.
    nnU-Net's output goes to root's build log, which is named on failure."""
    results = root / 'nnUNet_results'
    if (root / 'BUILT').is_file():
        return results
    root.parent.mkdir(parents=True, exist_ok=True)
    log = root.parent / f'{root.name}.build.log'
    tmp = Path(tempfile.mkdtemp(prefix='.building-', dir=root.parent))
    keep = {k: os.environ.get(k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results', 'nnUNet_n_proc_DA')}
    try:
        os.environ.update(nnUNet_raw=str(tmp / 'nnUNet_raw'), nnUNet_preprocessed=str(tmp / 'nnUNet_preprocessed'),
                          nnUNet_results=str(tmp / 'nnUNet_results'))
        with open(log, 'w', buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            steps(tmp / 'nnUNet_raw')
        import torch
        torch.use_deterministic_algorithms(False)  # a CAM run may go on in this process
        root.mkdir(parents=True, exist_ok=True)
        if results.exists():
            shutil.rmtree(results)
        shutil.move(str(tmp / 'nnUNet_results'), str(results))
    except BaseException as e:
        print(f'\n{label}: building failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}); '
              f'nnU-Net\'s log: {log}', file=sys.stderr, flush=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    (root / 'BUILT').write_text(version('nnunetv2'))
    return results


def plan_and_preprocess(dataset_id: int, configurations, planners=('ExperimentPlanner',),
                        plans: str = 'nnUNetPlans') -> None:
    """nnU-Net's fingerprint, planners, and preprocessing of `configurations` with the `plans` identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
    for planner in planners:
        plan_experiments([dataset_id], planner)
    preprocess([dataset_id], plans, configurations=tuple(configurations), num_processes=(1,) * len(configurations),
               show_progress_bar=False)


def _untrained_resenc(seed: int):
    """A ResidualEncoderUNet model folder from nnU-Net's ResEnc M planner, with its initial weights (layer names
    and the CAM path are what it tests; no training)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, save_json
    from nnunetv2.run.run_training import get_trainer_from_args
    _seed_everything(seed)
    trainer = get_trainer_from_args(DATASET_NAME, '3d_fullres', 0, plans_identifier=RESENC_PLANS,
                                    device=torch.device('cpu'))
    trainer.initialize()
    os.makedirs(trainer.output_folder, exist_ok=True)
    save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, 'plans.json'), sort_keys=False)
    save_json(trainer.dataset_json, join(trainer.output_folder_base, 'dataset.json'), sort_keys=False)
    trainer.save_checkpoint(join(trainer.output_folder, 'checkpoint_final.pth'))


def build_tiny_models(root: Path, n_train: int = 6) -> Path:
    """Dataset + plans + preprocessing + training for 2d (fold 0) and 3d_fullres (folds 0, 1), plus an untrained
    ResEnc M 3d_fullres model, all seeded. Returns the nnUNet_results folder."""
    seed = build_seed()

    def steps(raw_root: Path):
        import SimpleITK as sitk
        raw = raw_root / DATASET_NAME
        (raw / 'imagesTr').mkdir(parents=True)
        (raw / 'labelsTr').mkdir()
        rng = np.random.default_rng(seed)
        for i in range(n_train):
            # mixed sizes: the larger cases give training patches without the zero border in view, as in big cases
            small = i % 2 == 1
            img, lab = synthetic_case(rng, shape=(20, 40, 40) if small else (28, 64, 64), objects=2 if small else 3)
            sitk.WriteImage(img, str(raw / 'imagesTr' / f'tiny_{i:03d}_0000.nii.gz'))
            sitk.WriteImage(lab, str(raw / 'labelsTr' / f'tiny_{i:03d}.nii.gz'))
        # 'CT' makes nnU-Net normalise with dataset-wide intensities, so a class's brightness means the same in every case
        (raw / 'dataset.json').write_text(json.dumps({
            'channel_names': {'0': 'CT'}, 'labels': LABELS, 'numTraining': n_train, 'file_ending': '.nii.gz'}))
        plan_and_preprocess(DATASET_ID, ('2d', '3d_fullres'), ('ExperimentPlanner', 'nnUNetPlannerResEncM'))
        progress = BuildProgress('tiny models', 3)
        _train(DATASET_NAME, '3d_fullres', 0, seed, progress)
        _train(DATASET_NAME, '3d_fullres', 1, seed + 1, progress)
        _train(DATASET_NAME, '2d', 0, seed + 2, progress, epochs=30)
        _untrained_resenc(seed + 3)
    return build_once(root, 'tiny models', steps)


def model_folder(results: Path, configuration: str = '3d_fullres', plans: str = 'nnUNetPlans') -> Path:
    return results / DATASET_NAME / f'nnUNetTrainer__{plans}__{configuration}'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='Build the tiny demo model if absent and run NNUNetCAM on a sample case.')
    p.add_argument('-o', '--output', default='demo_output', help='output folder (default: %(default)s)')
    p.add_argument('--cache', type=Path, default=None, help='where the tiny models live (default: %(default)s)')
    p.add_argument('--build-only', action='store_true', help='only build (or find) the tiny models')
    args = p.parse_args(argv)
    root = args.cache or default_cache()
    print(f'tiny models: {root} ({"cached" if (root / "BUILT").is_file() else "building: about 10 min on two CPU cores"})',
          flush=True)
    results = build_tiny_models(root)
    if args.build_only:
        print(results)
        return 0
    from .cli import main as cli_main
    out = Path(args.output).resolve()
    case = write_sample_case(out / 'input')
    # the toy task is decided by intensity at full resolution, so the last decoder stage is the telling layer here
    rc = cli_main(['-i', str(case), '-o', str(out), '-m', str(model_folder(results)), '-f', '0', '1',
                   '--target-class', 'lesion', 'organ', '--target-layer', 'last_decoder', '--save-slices',
                   '-device', 'cpu', '--overwrite'])
    if rc == 0:
        print(f'\ndemo outputs in {out}:')
        for f in sorted(out.iterdir()):
            print(f'  {f.name}{"/" if f.is_dir() else ""}')
    return rc


if __name__ == '__main__':
    sys.exit(main())
