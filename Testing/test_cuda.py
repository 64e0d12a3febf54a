"""The CUDA path: autocast as nnU-Net runs it, and a real out-of-memory error (a capped allocator, not a simulated
one). Runs where torch sees a GPU (benchmarks/gpu_checks.sh); skipped elsewhere."""
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import nnunet_predict, read, run_cli
from nnunetv2_cam_core.api import CamEngine, _safe
from nnunetv2_cam_core.model import fold_networks, load_predictor
from nnunetv2_cam_core.sliding_window import CamSpec, RegionPrediction, sliding_window_cam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
CUDA = torch.device('cuda')


def array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(read(path))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_segmentation_equals_nnunet_predict_on_cuda(model3d, sample_case, tmp_path):
    """Both under nnU-Net's autocast, with TTA: at most 0.1 % of voxels differ (float16 accumulation)."""
    out = tmp_path / 'ours'
    assert run_cli(['-i', sample_case, '-o', out, '-m', model3d, '-f', '0', '--target-class', 'lesion',
                    '-device', 'cuda', '--progress', 'none']) == 0
    ref = nnunet_predict(model3d, sample_case.parent, tmp_path / 'ref', [0], tta=True, device='cuda')
    ours, theirs = array(out / 'sample.nii.gz'), array(ref / 'sample.nii.gz')
    assert (theirs == 1).sum() > 0
    print(f'\nCUDA, TTA: {(ours != theirs).sum()} of {ours.size} voxels differ from nnUNetv2_predict')
    assert (ours != theirs).mean() <= 1e-3


@pytest.mark.parametrize('method', ['gradcam', 'gradcam++', 'hirescam', 'eigencam', 'eigengradcam'])
def test_maps_under_autocast_agree_with_the_cpu(model3d, sample_case, tmp_path, method):
    """float16 forward and partial backward on CUDA, float32 maps: finite, and the raw map inside the case follows
    the CPU's float32 one (Pearson r >= 0.99)."""
    raw = {}
    for device in ('cpu', 'cuda'):
        out = tmp_path / device
        assert run_cli(['-i', sample_case, '-o', out, '-m', model3d, '-f', '0', '--target-class', 'lesion',
                        '--method', method, '--disable_tta', '--save-raw', '-device', device,
                        '--progress', 'none']) == 0
        raw[device] = array(out / f'sample_camraw_lesion_{_safe(method)}.nii.gz')
    assert np.isfinite(raw['cuda']).all() and raw['cuda'].max() > 0
    r = pearson(raw['cpu'], raw['cuda'])
    print(f'\n{method}: r(CPU, CUDA) = {r:.5f}')
    assert r >= 0.99


@pytest.fixture(scope='module')
def cuda_case(model3d, sample_case):
    pred = load_predictor(model3d, [0], 'checkpoint_final.pth', CUDA, use_mirroring=True)
    engine = CamEngine(pred, target_class=['lesion', 'organ'])
    data, _, _, _ = engine.preprocess([str(sample_case)])
    return pred, engine, fold_networks(pred), data


def peak_mb(fn):
    """The result, and the most the caching allocator held (reserved) while fn ran."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    return result, torch.cuda.max_memory_reserved() / 2 ** 20


class capped:
    """The allocator capped at `mb` (a real torch.OutOfMemoryError beyond it)."""

    def __init__(self, mb: float):
        self.fraction = mb * 2 ** 20 / torch.cuda.get_device_properties(0).total_memory

    def __enter__(self):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(self.fraction)

    def __exit__(self, *exc):
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.fixture(scope='module')
def ct_tile(tmp_path_factory):
    """The CT benchmark's network (6 stages, 32-320 features, random weights) on one 64^3 tile: its graphs, not
    the CUDA libraries' workspaces, decide the memory."""
    sys.path.insert(0, str(Path(__file__).parents[1] / 'benchmarks'))
    from gpu_ct import build_case, build_model
    tmp = tmp_path_factory.mktemp('ct')
    model = build_model(tmp / 'Dataset988_CTBench' / 'nnUNetTrainer__nnUNetPlans__3d_fullres', 64, folds=(0,))
    pred = load_predictor(model, [0], 'checkpoint_final.pth', CUDA, use_mirroring=True)
    engine = CamEngine(pred, target_layer='bottleneck', target_class=1, target_region='all')
    data, _, _, _ = engine.preprocess([str(build_case(tmp / 'case', 64))])
    return pred, engine, fold_networks(pred), data


def test_a_real_out_of_memory_error_is_retried_with_one_graph(ct_tile):
    """8 mirrors backpropagated together need far more memory than one graph at a time. With the allocator capped
    between the two, the run hits CUDA's own out-of-memory error and redoes the case with results on the CPU and
    one graph at a time. Logits as the uncapped run's; maps as the --low-memory run's and the joint one's, up to
    float16 rounding, which a deep backward through this random network amplifies (5-6 % of the peak between joint and
    one-at-a-time on the H200; README "On a GPU"), so compared by correlation."""
    pred, engine, nets, data = ct_tile
    spec = CamSpec(engine.method, engine.layers, engine.targets, region='all')
    joint, joint_mb = peak_mb(lambda: sliding_window_cam(pred, nets, data, spec))
    low_spec = CamSpec(engine.method, engine.layers, engine.targets, region='all', low_memory=True)
    low, low_mb = peak_mb(lambda: sliding_window_cam(pred, nets, data, low_spec))
    print(f'\npeak reserved: joint {joint_mb:.0f} MB, one graph at a time {low_mb:.0f} MB')
    assert joint_mb > 2 * low_mb
    with capped((joint_mb + low_mb) / 2):
        retried = sliding_window_cam(pred, nets, data, spec)
    assert retried.out_of_memory_retry and retried.low_memory and low.cams.abs().max() > 0
    assert torch.allclose(retried.logits, joint.logits, rtol=1e-3, atol=1e-3 * float(joint.logits.abs().max()))
    for other in (low, joint):
        assert pearson(retried.cams.numpy(), other.cams.numpy()) >= 0.95


def test_region_prediction_halves_its_batch_on_a_real_out_of_memory_error(cuda_case):
    """Re-predicting a region batches variants x mirrors per network; capped below the batch of 16 it halves the
    batch and still gives the one-at-a-time logits."""
    pred, engine, nets, data = cuda_case
    region = torch.zeros(data.shape[1:], dtype=torch.bool)
    centre = np.unravel_index(int(torch.argmax(data[0])), data.shape[1:])
    region[tuple(slice(max(c - 4, 0), c + 4) for c in centre)] = True
    variants = [data, data * 0.5]
    one, one_mb = peak_mb(lambda: RegionPrediction(pred, nets, data, region, batch=1)(variants))
    _, full_mb = peak_mb(lambda: RegionPrediction(pred, nets, data, region, batch=16)(variants))
    print(f'\npeak reserved: batch 16 {full_mb:.0f} MB, batch 1 {one_mb:.0f} MB')
    assert full_mb > 2 * one_mb
    rp = RegionPrediction(pred, nets, data, region, batch=16)
    with capped((full_mb + one_mb) / 2):
        halved = rp(variants)
    assert rp.batch < 16
    for a, b in zip(halved, one):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
