"""Real tiny nnU-Net models, trained once with nnU-Net's own planner and trainer and cached per nnunetv2 version."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder, write_sample_case

torch.set_num_threads(2)


@pytest.fixture(scope='session')
def results_dir() -> Path:
    root = default_cache()
    if not (root / 'BUILT').is_file():
        # a separate process: nnU-Net training starts workers and sets global torch state
        subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core.demo', '--build-only'], check=True)
    return build_tiny_models(root)


@pytest.fixture(scope='session')
def model3d(results_dir) -> Path:
    return model_folder(results_dir, '3d_fullres')


@pytest.fixture(scope='session')
def model2d(results_dir) -> Path:
    return model_folder(results_dir, '2d')


@pytest.fixture(scope='session')
def sample_case(tmp_path_factory) -> Path:
    """Larger than the patch (many tiles), spacing unlike the plan's (resampling happens), rotated, offset."""
    return write_sample_case(tmp_path_factory.mktemp('sample'))


@pytest.fixture(scope='session')
def small_case(tmp_path_factory) -> Path:
    """Smaller than the 3D patch along every axis."""
    return write_sample_case(tmp_path_factory.mktemp('small'), seed=7, shape=(16, 32, 32), spacing=(1.0, 1.0, 1.8),
                             name='small')


def run_cli(args, capsys=None):
    from nnunetv2_cam_core.cli import main
    rc = main([str(a) for a in args])
    return rc


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def read(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def geometry(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
