"""Each native method's raw single-tile map against pytorch-grad-cam's, same tile, layer and target (2D and 3D)."""
import numpy as np
import pytest
import torch

from nnunetv2_cam_core.api import CamEngine
from nnunetv2_cam_core.methods import NATIVE, get_method
from nnunetv2_cam_core.model import fold_networks, load_predictor
from nnunetv2_cam_core.sliding_window import CamSpec, sliding_window_cam, upsample

REFERENCE = {'gradcam': 'GradCAM', 'gradcam++': 'GradCAMPlusPlus', 'xgradcam': 'XGradCAM', 'hirescam': 'HiResCAM',
             'gradcamelementwise': 'GradCAMElementWise', 'layercam': 'LayerCAM', 'eigencam': 'EigenCAM',
             'eigengradcam': 'EigenGradCAM'}


def brightest_tile(data: torch.Tensor, patch, two_d: bool) -> torch.Tensor:
    """The patch-sized crop centred on the brightest voxel (a lesion)."""
    spatial = data.shape[1:]
    centre = np.unravel_index(int(torch.argmax(data[0])), spatial)
    if two_d:
        z = centre[0]
        starts = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre[1:], patch, spatial[1:])]
        return data[:, z:z + 1, starts[0]:starts[0] + patch[0], starts[1]:starts[1] + patch[1]].contiguous()
    starts = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, spatial)]
    return data[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch)])].contiguous()


@pytest.fixture(scope='module', params=['3d_fullres', '2d'])
def tile_setup(request, model3d, model2d, sample_case):
    folder = model3d if request.param == '3d_fullres' else model2d
    pred = load_predictor(folder, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, target_class='lesion')
    data, _, _, _ = engine.preprocess([str(sample_case)])
    patch = [int(p) for p in pred.configuration_manager.patch_size]
    tile = brightest_tile(data, patch, request.param == '2d')
    return pred, engine, tile, request.param == '2d'


def reference_map(name, net, layer, x, channel):
    import copy
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
    net = copy.deepcopy(net).requires_grad_(True)  # the library backpropagates through parameters
    module = dict(net.named_modules())[layer]
    with torch.no_grad():
        mask = (net(x)[0].argmax(0) == channel).float()
    target = [lambda o: (o[channel] * mask).sum()]
    if not name.startswith('eigen'):
        cam = getattr(pytorch_grad_cam, REFERENCE[name])(model=net, target_layers=[module])
        return cam(input_tensor=x, targets=target)[0]
    # the library's SVD sign is arbitrary (and its full SVD of a full-resolution layer needs tens of GB): take the
    # tensors its hooks capture, its own sign-corrected projection, and our upsampling to the tile
    cam = pytorch_grad_cam.GradCAM(model=net, target_layers=[module])
    cam(input_tensor=x, targets=target)
    acts = cam.activations_and_grads.activations[0].cpu().numpy()
    if name == 'eigengradcam':
        acts = cam.activations_and_grads.gradients[0].cpu().numpy() * acts
    proj = np.maximum(get_2d_projection_with_sign_correction(acts)[0], 0)
    return upsample(torch.from_numpy(proj), x.shape[2:]).numpy()


@pytest.mark.parametrize('name', list(REFERENCE))
def test_native_method_matches_pytorch_grad_cam(tile_setup, name):
    pred, engine, tile, two_d = tile_setup
    net = fold_networks(pred)[0]
    # full resolution, so no resampling differences; a stride-2 stage for the eigen methods (SVD memory)
    last = len(net.decoder.stages) - 1
    layer = f'decoder.stages.{last - 1 if name.startswith("eigen") else last}'
    spec = CamSpec(get_method(name), [layer], engine.targets, pooling='tile')
    mine = sliding_window_cam(pred, [net], tile, spec).cams[0, 0].numpy()
    x = tile[:, 0][None] if two_d else tile[None]
    ref = reference_map(name, net, layer, x, engine.targets[0].channel)
    mine = mine[0] if two_d else mine
    assert mine.shape == ref.shape
    assert mine.max() > 0 and ref.max() > 0
    r = np.corrcoef(mine.ravel(), ref.ravel())[0, 1]
    assert r >= 0.999, f'{name}: r={r:.5f}'


def test_segxrescam_pool1_is_hirescam(tile_setup):
    pred, engine, tile, _ = tile_setup
    net = fold_networks(pred)[0]
    maps = [sliding_window_cam(pred, [net], tile, CamSpec(m, engine.layers, engine.targets)).cams[0, 0]
            for m in (get_method('hirescam'), get_method('segxrescam', pool_size=1))]
    assert torch.allclose(maps[0], maps[1], rtol=1e-5, atol=1e-12)
    pooled = sliding_window_cam(pred, [net], tile, CamSpec(get_method('segxrescam', 2, 'max'), engine.layers,
                                                           engine.targets)).cams[0, 0]
    assert not torch.allclose(pooled, maps[0])


def test_native_methods_never_import_pytorch_grad_cam():
    import subprocess
    import sys
    code = ('import sys; from nnunetv2_cam_core.methods import get_method; import torch; '
            'm = get_method("gradcam++"); A = torch.rand(1, 4, 5, 5, 5); m.cam(A, torch.rand_like(A), (2, 3, 4)); '
            'print("pytorch_grad_cam" in sys.modules)')
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout.strip() == 'False'


def test_adapter_method_runs_in_3d():
    m = get_method('fem')
    A = torch.rand(2, 6, 4, 5, 5)
    out = m.cam(A, None, (2, 3, 4))
    assert out.shape == (2, 4, 5, 5) and torch.isfinite(out).all()


def test_method_list_is_complete():
    assert set(REFERENCE) | {'segxrescam'} == set(NATIVE)


@pytest.mark.parametrize('scale', [1.0, 1e-3, 1e-4])
@pytest.mark.parametrize('name', ['gradcam', 'gradcam++', 'xgradcam'])
def test_pooled_weights_match_pytorch_grad_cam_at_small_gradients(name, scale):
    """The library's own get_cam_weights on the same tensors (2D, as it is written), gradients as small as a few
    target voxels at a tile corner give: its constants decide the map there."""
    import pytorch_grad_cam
    rng = np.random.default_rng(0)
    A = rng.random((1, 16, 7, 7)).astype(np.float32)
    G = (rng.standard_normal((1, 16, 7, 7)) * scale).astype(np.float32)
    ref_w = getattr(pytorch_grad_cam, REFERENCE[name]).get_cam_weights(None, None, None, None, A, G)
    ref = np.maximum((ref_w[:, :, None, None] * A).sum(1), 0)
    mine = get_method(name).cam(torch.from_numpy(A), torch.from_numpy(G), (2, 3)).clamp(min=0).numpy()
    assert ref.max() > 0
    assert np.allclose(mine / mine.max(), ref / ref.max(), atol=1e-4)


def test_segxrescam_each_voxel_gets_its_own_window():
    """Length 7, windows of 3: {0,1,2}, {3,4,5}, {6}; checked against a direct per-window max."""
    rng = np.random.default_rng(1)
    A = torch.from_numpy(rng.random((1, 4, 7, 5, 8)).astype(np.float32))
    G = torch.from_numpy(rng.standard_normal((1, 4, 7, 5, 8)).astype(np.float32))
    k = 3
    pooled = torch.empty_like(G)
    for z in range(7):
        for y in range(5):
            for x in range(8):
                win = G[:, :, z // k * k:(z // k + 1) * k, y // k * k:(y // k + 1) * k, x // k * k:(x // k + 1) * k]
                pooled[:, :, z, y, x] = win.amax((2, 3, 4))
    ref = (pooled * A).sum(1)
    assert torch.allclose(get_method('segxrescam', pool_size=k).cam(A, G, (2, 3, 4)), ref, atol=1e-6)


@pytest.mark.parametrize('name', ['eigencam', 'eigengradcam'])
def test_maps_are_float32_under_float16_autocast(name):
    """CUDA runs the network under float16 autocast; the maps must not be computed in it. Emulated on the CPU:
    300k positions, where a float16 covariance overflows."""
    rng = np.random.default_rng(2)
    A = torch.from_numpy(rng.random((1, 32, 40, 80, 96)).astype(np.float32) * 4)
    G = torch.from_numpy(rng.standard_normal((1, 32, 40, 80, 96)).astype(np.float32))
    m = get_method(name)
    ref = m(A, G, (0, 2, 3, 4))
    with torch.autocast('cpu', dtype=torch.float16):
        emulated = m(A.half(), G.half(), (0, 2, 3, 4))
    assert emulated.dtype == torch.float32 and torch.isfinite(emulated).all()
    assert np.corrcoef(emulated.ravel().numpy(), ref.ravel().numpy())[0, 1] >= 0.999
