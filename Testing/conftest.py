"""Real tiny nnU-Net models, trained once with nnU-Net's own planner and trainer and cached per nnunetv2 version."""
import json
import os
import shutil
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


def kind_model(kind: str) -> Path:
    """A tiny model of another kind (model_kinds.KINDS), built in a separate process on first use."""
    from nnunetv2_cam_core.model_kinds import build_kind, kind_root
    if not (kind_root(kind) / 'BUILT').is_file():
        subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core.model_kinds', kind], check=True,
                       stdout=subprocess.DEVNULL)
    return build_kind(kind)


def start_server(results_dir: Path, folder: Path, *extra, **popen):
    """A real `nnunetv2_cam serve` on 127.0.0.1 over `results_dir`, its token in folder/token and its work folder
    in folder/tmp (`popen`: more for subprocess.Popen). Returns the process and its 'listening' event (url, token)."""
    (folder / 'tmp').mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, '-m', 'nnunetv2_cam_core', 'serve', '--models', str(results_dir),
                             '--port', '0', '--token-file', str(folder / 'token'), '-device', 'cpu', *extra],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, 'TMPDIR': str(folder / 'tmp')},
                            **popen)
    return proc, json.loads(proc.stdout.readline())


def nnunet_predict(model: Path, inputs: Path, out: Path, folds, tta: bool, prev_stage: Path = None,
                   device: str = 'cpu', save_probabilities: bool = False) -> Path:
    """nnU-Net's own prediction, as a user runs it (a cascade stage with the previous stage's folder; with
    `save_probabilities`, CASE.npz and CASE.pkl too)."""
    cmd = ['nnUNetv2_predict_from_modelfolder', '-i', str(inputs), '-o', str(out), '-m', str(model),
           '-f', *map(str, folds), '-device', device, '-npp', '1', '-nps', '1']
    if prev_stage is not None:
        cmd += ['-prev_stage_predictions', str(prev_stage)]
    if not tta:
        cmd.append('--disable_tta')
    if save_probabilities:
        cmd.append('--save_probabilities')
    exe = shutil.which(cmd[0], path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')]))
    subprocess.run([exe or cmd[0], *cmd[1:]], check=True,
                   stdout=subprocess.DEVNULL)
    return out


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


def write_cohort(folder: Path, seeds, contrast: float = 1.0) -> Path:
    """Small one-object cases named caseNNN, a few tiles each (contrast < 1: the objects dimmed)."""
    for s in seeds:
        write_sample_case(folder, seed=s, shape=(20, 40, 40), spacing=(1.0, 1.0, 1.8), objects=1,
                          name=f'case{s:03d}', contrast=contrast)
    return folder


def cam_args(model, inputs, out, *extra) -> list:
    """A CPU run of the tiny model: fold 0, no TTA, lesion."""
    return [str(a) for a in ('-i', inputs, '-o', out, '-m', model, '-f', '0', '--disable_tta', '--target-class',
                             'lesion', '-device', 'cpu', *extra)]


def assert_same_outputs(a: Path, b: Path, cases: int) -> None:
    """The same files; images equal in geometry and (to float32 rounding) in values."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len([n for n in names if n.endswith('_cam.json')]) == cases
    for name in names:
        if name.endswith('.nii.gz'):
            x, y = read(a / name), read(b / name)
            assert geometry(x) == geometry(y), name
            np.testing.assert_allclose(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y), atol=1e-5, err_msg=name)


def geometry(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


HALF_ROUNDOFF = 2.0 ** -11  # float16's unit roundoff: nnU-Net accumulates tile logits in float16
HALF_SUBNORMAL_ROUNDOFF = 2.0 ** -25  # below 2^-14 float16 rounds to multiples of 2^-24, whatever the value


class _Float32Torch:
    """torch, with torch.half meaning float32: nnU-Net's sliding window with a float32 accumulator."""
    half = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


@dataclass
class LogitsPair:
    """One preprocessed case through the engine and through nnU-Net's own predict_logits_from_preprocessed_data,
    as it ships (float16 accumulation) and with its accumulator switched to float32; same folds, mirroring, step."""
    predictor: object
    data: torch.Tensor  # preprocessed
    properties: dict
    ours: torch.Tensor
    nnunet: torch.Tensor    # nnU-Net as it ships
    nnunet32: torch.Tensor  # nnU-Net with a float32 accumulator
    overlap: int            # the most tiles that cover one voxel
    tile_peak: float        # the largest |logit| of any tile nnU-Net predicted (folds and mirrors averaged)
    weight: torch.Tensor    # nnU-Net's float16 gaussian weight sum per voxel

    @property
    def difference(self) -> float:
        return float((self.ours - self.nnunet).abs().max())

    @property
    def rounding_bound(self) -> torch.Tensor:
        """Per voxel, what float16 accumulation can change a logit by, to first order, with L the largest tile
        logit and W the voxel's gaussian weight sum: per fold, T rounded products g*l, T rounded sums of g*l and of
        g, one rounded quotient: (2T + 2) u L; the F folds' sum and mean, F u L; and where g*l or g fall below
        float16's normal range (tile corners), an absolute 2^-25 per operation, divided by W: T (2 + L) 2^-25 / W.
        Plus 1 % for second-order terms and float32 rounding."""
        folds, t, peak = len(self.predictor.list_of_parameters), self.overlap, self.tile_peak
        return 1.01 * ((2 * t + 2 + folds) * HALF_ROUNDOFF * peak
                       + t * (2 + peak) * HALF_SUBNORMAL_ROUNDOFF / self.weight)

    def segmentation(self, logits: torch.Tensor) -> np.ndarray:
        """nnU-Net's own export of these logits (its segmentation in the original geometry) and probabilities."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        p = self.predictor
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, p.plans_manager, p.configuration_manager, p.label_manager, self.properties,
            return_probabilities=True)


def logits_pair(model: Path, folds, case, tta: bool = False, prev_stage: str = None) -> LogitsPair:
    """`case`: an image file, or a case's channel files; `prev_stage`: a cascade's previous-stage segmentation."""
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.model import load_predictor
    from nnunetv2_cam_core.sliding_window import CamSpec, sliding_window_cam
    pred = load_predictor(model, folds, 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=tta)
    engine = CamEngine(pred)
    data, props, _, _ = engine.preprocess([str(c) for c in (case if isinstance(case, (list, tuple)) else [case])],
                                          prev_stage=prev_stage)
    ours = sliding_window_cam(pred, engine.networks, data, CamSpec(engine.method, engine.layers, engine.targets))
    peak = [0.0]

    def recording(x, predict=pred._internal_maybe_mirror_and_predict):
        out = predict(x)
        peak[0] = max(peak[0], float(out.abs().max()))
        return out
    pred._internal_maybe_mirror_and_predict = recording
    nnunet = pred.predict_logits_from_preprocessed_data(data).float()
    del pred._internal_maybe_mirror_and_predict
    shipped = predict_from_raw_data.torch
    predict_from_raw_data.torch = _Float32Torch()
    try:
        nnunet32 = pred.predict_logits_from_preprocessed_data(data)
    finally:
        predict_from_raw_data.torch = shipped
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    patch = pred.configuration_manager.patch_size
    padded, revert = pad_nd_image(data, patch, 'constant', {'value': 0}, True, None)
    count = torch.zeros(padded.shape[1:], dtype=torch.int32)
    weight = torch.zeros(padded.shape[1:], dtype=torch.float32)
    gaussian = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10,
                                device=torch.device('cpu')).float()  # nnU-Net's float16 weights
    for sl in pred._internal_get_sliding_window_slicers(padded.shape[1:]):
        count[sl[1:]] += 1
        weight[sl[1:]] += gaussian
    return LogitsPair(pred, data, props, ours.logits, nnunet, nnunet32.float(), int(count.max()), peak[0],
                      weight[tuple(revert[1:])])


def assert_equals_nnunet(ours: np.ndarray, theirs: np.ndarray, pair: LogitsPair, max_fraction: float = 1e-3):
    """What 'equal to nnUNetv2_predict' means, as a chain of equalities: our segmentation is nnU-Net's own export of
    nnU-Net's own logits accumulated in float32 (where not, a tie at float32 rounding); nnUNetv2_predict's is the
    same export of the float16-accumulated logits, which differ from the float32 ones by no more than float16
    rounding. So every voxel where ours and nnUNetv2_predict's differ is one the float16 accumulation changed, and
    such voxels are a tiny fraction of the case. Returns (voxels that differ, largest logit difference)."""
    assert ours.shape == theirs.shape
    scale = float(pair.nnunet32.abs().max())
    assert float((pair.ours - pair.nnunet32).abs().max()) <= 1e-5 * scale, 'ours is not nnU-Net\'s float32 sliding window'
    excess = float(((pair.nnunet - pair.nnunet32).abs() - pair.rounding_bound).max())
    assert excess <= 0, f'nnU-Net\'s float16 logits differ from its float32 ones by {excess:.3g} more than rounding'
    seg32, probs32 = pair.segmentation(pair.nnunet32)
    ties = ours != seg32
    if ties.any():  # only a tie at float32 rounding may go either way
        probs = np.sort(np.asarray(probs32, dtype=np.float64), axis=0)
        gap = probs[-1] - probs[-2] if not pair.predictor.label_manager.has_regions else \
            np.abs(np.asarray(probs32, dtype=np.float64) - 0.5).min(0)
        assert float(gap[ties].max()) <= 1e-4, f'{ties.sum()} voxels differ from nnU-Net\'s float32 export'
    seg16, _ = pair.segmentation(pair.nnunet)
    # the same export in another process: only a thread-count difference in the convolutions could change a voxel
    assert (seg16 != theirs).mean() <= 1e-4, 'nnUNetv2_predict\'s file is not the export of its float16 logits'
    differ = ours != theirs  # so, but for ties, where float16 changed nnU-Net's own label
    assert differ.mean() <= max_fraction, f'{differ.sum()} voxels differ ({differ.mean():.2%})'
    return int(differ.sum()), pair.difference
