"""Real tiny nnU-Net models, trained once with nnU-Net's own planner and trainer and cached per nnunetv2 version."""
import subprocess
import sys
from dataclasses import dataclass
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


def read(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def geometry(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


HALF_ROUNDOFF = 2.0 ** -11  # float16's unit roundoff: nnU-Net accumulates tile logits in float16


@dataclass
class LogitsPair:
    """One preprocessed case through the engine (float32 accumulation) and through nnU-Net's own
    predict_logits_from_preprocessed_data (float16 accumulation), same folds, mirroring and step."""
    predictor: object
    data: torch.Tensor  # preprocessed
    properties: dict
    ours: torch.Tensor
    nnunet: torch.Tensor
    overlap: int        # the most tiles that cover one voxel
    tile_peak: float    # the largest |logit| of any tile nnU-Net predicted (folds and mirrors averaged)

    @property
    def difference(self) -> float:
        return float((self.ours - self.nnunet).abs().max())

    @property
    def rounding_bound(self) -> float:
        """What float16 accumulation can change a logit by, to first order, with L the largest tile logit: per fold,
        T rounded sums of g*l and of g (each off by at most u times the sum) and one rounded quotient, (2T + 1) u L;
        then the sum and mean of F folds, under F u L. Plus 1 % for second-order terms and float32 rounding."""
        folds = len(self.predictor.list_of_parameters)
        return 1.01 * (2 * self.overlap + 1 + folds) * HALF_ROUNDOFF * self.tile_peak

    def nnunet_probabilities(self) -> np.ndarray:
        """nnU-Net's probabilities from its own logits and export function, in the original geometry."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        p = self.predictor
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            self.nnunet, p.plans_manager, p.configuration_manager, p.label_manager, self.properties,
            return_probabilities=True)[1]


def logits_pair(model: Path, folds, case: Path, tta: bool = False) -> LogitsPair:
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.model import load_predictor
    from nnunetv2_cam_core.sliding_window import CamSpec, sliding_window_cam
    pred = load_predictor(model, folds, 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=tta)
    engine = CamEngine(pred)
    data, props, _, _ = engine.preprocess([str(case)])
    ours = sliding_window_cam(pred, engine.networks, data, CamSpec(engine.method, engine.layers, engine.targets))
    peak = [0.0]

    def recording(x, predict=pred._internal_maybe_mirror_and_predict):
        out = predict(x)
        peak[0] = max(peak[0], float(out.abs().max()))
        return out
    pred._internal_maybe_mirror_and_predict = recording
    nnunet = pred.predict_logits_from_preprocessed_data(data).float()
    del pred._internal_maybe_mirror_and_predict
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    padded = pad_nd_image(data, pred.configuration_manager.patch_size, 'constant', {'value': 0}, False, None)
    count = torch.zeros(padded.shape[1:], dtype=torch.int32)
    for sl in pred._internal_get_sliding_window_slicers(padded.shape[1:]):
        count[sl[1:]] += 1
    return LogitsPair(pred, data, props, ours.logits, nnunet, int(count.max()), peak[0])


def assert_equals_nnunet(ours: np.ndarray, theirs: np.ndarray, pair: LogitsPair, max_fraction: float = 1e-3):
    """What 'equal to nnUNetv2_predict' means: our logits differ from nnU-Net's by no more than its float16
    accumulation can explain, so every voxel whose label differs is a near tie in nnU-Net's own output (its top-two
    probabilities closer than e^(2 eps) - 1), and such voxels are a tiny fraction of the case."""
    eps = pair.difference
    assert eps <= pair.rounding_bound, f'logits differ by {eps:.4g}, more than float16 rounding ({pair.rounding_bound:.4g})'
    assert ours.shape == theirs.shape
    differ = ours != theirs
    if differ.any():
        top2 = np.sort(np.asarray(pair.nnunet_probabilities(), dtype=np.float64), axis=0)[-2:]
        margin = float((top2[1] - top2[0])[differ].max())
        assert margin <= np.expm1(2 * eps) + 1e-6, f'a differing voxel is no near tie: margin {margin:.4g}'
    assert differ.mean() <= max_fraction, f'{differ.sum()} voxels differ ({differ.mean():.2%})'
    return int(differ.sum()), eps
