"""End to end on real tiny models: CLI round trip, segmentation equal to nnU-Net's, geometry, values, outputs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import assert_equals_nnunet, geometry, logits_pair, nnunet_predict, read


@pytest.fixture(scope='session')
def cli_run(model3d, sample_case, tmp_path_factory):
    """One CLI run as the Slicer module makes it: subprocess, JSON progress, two folds, two classes."""
    out = tmp_path_factory.mktemp('cli_out')
    before = sample_case.read_bytes()
    proc = subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', '-i', str(sample_case), '-o', str(out),
                           '-m', str(model3d), '-f', '0', '1', '--target-class', 'lesion', 'organ', '-device', 'cpu',
                           '--disable_tta', '--save-slices', '--save-raw', '--save-numpy', '--progress', 'json'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sample_case.read_bytes() == before, 'input was modified'
    return out, proc


@pytest.fixture(scope='session')
def nnunet_ref(model3d, sample_case, tmp_path_factory):
    return nnunet_predict(model3d, sample_case.parent, tmp_path_factory.mktemp('ref3d'), [0, 1], tta=False)


@pytest.fixture(scope='session')
def pair3d(model3d, sample_case):
    return logits_pair(model3d, [0, 1], sample_case)


def test_progress_json_lines(cli_run):
    out, proc = cli_run
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    stages = [e['stage'] for e in lines if e['event'] == 'stage']
    assert stages[:4] == ['load', 'preprocess', 'tiles', 'export'] and stages[-1] == 'done'
    tiles = [e for e in lines if e['event'] == 'tiles']
    assert tiles[-1]['tile'] == tiles[-1]['tiles'] > 1 and tiles[-1]['fraction'] == 1.0
    assert all('eta_s' in e for e in tiles)
    result = [e for e in lines if e['event'] == 'result'][0]
    assert all(Path(f).exists() for f in result['files'])


def test_logits_differ_from_nnunet_only_by_its_float16_accumulation(pair3d):
    """The cause of every difference: with nnU-Net's accumulator switched to float32, its logits equal ours to
    float32 rounding; as it ships (float16), they differ by no more than float16 rounding, voxel by voxel."""
    assert pair3d.nnunet32.dtype == torch.float32
    assert float((pair3d.nnunet32 - pair3d.ours).abs().max()) <= 1e-5 * float(pair3d.ours.abs().max())
    assert 0 < pair3d.difference
    assert bool(((pair3d.ours - pair3d.nnunet).abs() <= pair3d.rounding_bound).all())


def test_segmentation_equals_nnunet_predict(cli_run, nnunet_ref, pair3d):
    out, _ = cli_run
    ours = sitk.GetArrayFromImage(read(out / 'sample.nii.gz'))
    ref = sitk.GetArrayFromImage(read(nnunet_ref / 'sample.nii.gz'))
    for label in (1, 2):
        assert (ref == label).sum() > 0, f'reference predicts no voxel of class {label}: model too weak for the test'
    differing, eps = assert_equals_nnunet(ours, ref, pair3d)
    print(f'\n3d_fullres, folds 0 1: {differing} voxels differ from nnUNetv2_predict, logits by {eps:.4g}')


def test_outputs_have_input_geometry(cli_run, sample_case):
    out, _ = cli_run
    g = geometry(read(sample_case))
    for name in ('sample.nii.gz', 'sample_cam_lesion_gradcam.nii.gz', 'sample_cam_organ_gradcam.nii.gz',
                 'sample_camraw_lesion_gradcam.nii.gz'):
        img = read(out / name)
        size, spacing, origin, direction = geometry(img)
        assert size == g[0]
        assert np.allclose(spacing, g[1], atol=1e-5) and np.allclose(origin, g[2], atol=1e-4)
        assert np.allclose(direction, g[3], atol=1e-6)
    assert read(out / 'sample_cam_lesion_gradcam.nii.gz').GetPixelID() == sitk.sitkFloat32


def test_cam_values_and_sidecar(cli_run):
    out, _ = cli_run
    side = json.loads((out / 'sample_cam.json').read_text())
    for name in ('lesion', 'organ'):
        cam = sitk.GetArrayFromImage(read(out / f'sample_cam_{name}_gradcam.nii.gz'))
        assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
        assert np.array_equal(np.load(out / f'sample_cam_{name}_gradcam.npy'), cam)
        st = side['classes'][name]
        assert st['max'] == pytest.approx(1.0) and 0 <= st['energy_in_predicted_mask'] <= 1
        slices = sorted((out / f'sample_cam_{name}_gradcam_slices').glob('*.png'))
        assert len(slices) == cam.shape[0]
    for key in ('model', 'configuration', 'folds', 'checkpoint', 'layers', 'method', 'tta', 'step_size', 'device',
                'versions', 'timings_s'):
        assert key in side
    assert side['folds'] == [0, 1] and side['configuration'] == '3d_fullres'
    n_stages = json.loads((Path(side['model']) / 'plans.json').read_text())['configurations']['3d_fullres'][
        'architecture']['arch_kwargs']['n_stages']
    assert side['layers'] == [f'decoder.stages.{n_stages - 2}'] and side['tta'] is False  # the default: last decoder
    assert (out / 'sample_overview.png').is_file()
    assert not [p for p in out.iterdir() if p.name.startswith('.nnunetcam-')], 'temp folder left behind'


def test_existing_outputs_are_skipped_then_overwritten(cli_run, model3d, sample_case, capsys, tmp_path):
    import shutil
    from nnunetv2_cam_core.cli import main
    out = tmp_path / 'out'
    shutil.copytree(cli_run[0], out)
    side = out / 'sample_cam.json'
    before = side.read_text()
    args = ['-i', str(sample_case), '-o', str(out), '-m', str(model3d), '-f', '0', '--target-class', '1',
            '-device', 'cpu', '--disable_tta', '--progress', 'bar']
    assert main(args) == 0
    assert 'skipped' in capsys.readouterr().err
    assert side.read_text() == before
    assert main(args + ['--overwrite']) == 0
    assert json.loads(side.read_text())['folds'] == [0]


def test_2d_model_matches_nnunet_and_geometry(model2d, small_case, tmp_path):
    from nnunetv2_cam_core.cli import main
    out = tmp_path / 'out'
    assert main(['-i', str(small_case), '-o', str(out), '-m', str(model2d), '-f', '0', '--target-class', 'lesion',
                 '-device', 'cpu', '--progress', 'none']) == 0
    ref = nnunet_predict(model2d, small_case.parent, tmp_path / 'ref', [0], tta=True)
    ours = sitk.GetArrayFromImage(read(out / 'small.nii.gz'))
    theirs = sitk.GetArrayFromImage(read(ref / 'small.nii.gz'))
    assert_equals_nnunet(ours, theirs, logits_pair(model2d, [0], small_case, tta=True))
    cam = read(out / 'small_cam_lesion_gradcam.nii.gz')
    assert geometry(cam)[0] == geometry(read(small_case))[0]
    arr = sitk.GetArrayFromImage(cam)
    assert np.isfinite(arr).all() and 0 <= arr.min() and arr.max() <= 1


def test_image_smaller_than_patch(model3d, small_case, tmp_path):
    from nnunetv2_cam_core.cli import main
    out = tmp_path / 'out'
    assert main(['-i', str(small_case), '-o', str(out), '-m', str(model3d), '-f', '0', '--target-class', 'lesion',
                 '--target-region', 'all', '-device', 'cpu', '--progress', 'none']) == 0
    arr = sitk.GetArrayFromImage(read(out / 'small_cam_lesion_gradcam.nii.gz'))
    assert np.isfinite(arr).all() and arr.max() == pytest.approx(1.0) and arr.min() >= 0


def test_absent_target_writes_zero_map(model3d, tmp_path, capsys):
    from nnunetv2_cam_core.cli import main
    from nnunetv2_cam_core.demo import write_sample_case
    # a case with nothing but background noise: no lesion predicted anywhere
    img_path = write_sample_case(tmp_path / 'in', seed=3, shape=(16, 40, 40), spacing=(0.9, 0.9, 2.0), name='empty')
    img = sitk.ReadImage(str(img_path))
    arr = sitk.GetArrayFromImage(img)
    arr[arr > 0] = 150.0
    flat = sitk.GetImageFromArray(arr)
    flat.CopyInformation(img)
    sitk.WriteImage(flat, str(img_path))
    out = tmp_path / 'out'
    rc = main(['-i', str(img_path), '-o', str(out), '-m', str(model3d), '-f', '0', '--target-class', 'lesion',
               '-device', 'cpu', '--progress', 'bar'])
    assert rc == 0
    cam = sitk.GetArrayFromImage(read(out / 'empty_cam_lesion_gradcam.nii.gz'))
    seg = sitk.GetArrayFromImage(read(out / 'empty.nii.gz'))
    if (seg == 1).any():
        pytest.skip('the tiny model predicts lesion on a flat image')
    assert np.all(cam == 0)
    assert 'absent' in capsys.readouterr().err


def test_target_mask_and_api(model3d, sample_case, tmp_path):
    """--target-mask in the input geometry; the Python API returns maps in the original geometry."""
    import torch
    from nnunetv2_cam_core import predict_with_cam, run_cam_for_prediction
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.model import load_predictor
    label = read(sample_case.parent / 'labels' / 'sample.nii.gz')
    mask = sitk.Cast(label == 1, sitk.sitkUInt8)
    mask_path = tmp_path / 'mask.nii.gz'
    sitk.WriteImage(mask, str(mask_path))
    pred = load_predictor(model3d, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, target_class='lesion')
    data, props, m, _ = engine.preprocess([str(sample_case)], target_mask=str(mask_path))
    assert m is not None and m.shape == data.shape[1:] and m.any()
    res = engine.run(data, props, m)
    cam = res.cams['lesion']
    assert cam.shape == sitk.GetArrayFromImage(label).shape and cam.max() == pytest.approx(1.0)
    seg, cams = predict_with_cam(pred, data, dict(props), target_class='lesion')
    assert seg.shape == cam.shape and set(cams) == {'lesion'}
    maps = run_cam_for_prediction(pred, str(sample_case), tmp_path / 'api', target_layer=engine.layers[0],
                                  target_class=1, method='gradcam', cam_type='2d', save_slices=False)
    assert len(maps) == 1 and maps[0].shape == cam.shape
    assert (tmp_path / 'api' / 'sample_cam_lesion_gradcam.nii.gz').is_file()


def test_residual_encoder_unet(results_dir, small_case, tmp_path):
    """ResEnc plans (nnU-Net's ResEnc M planner): bottleneck default, decoder layer, segmentation equal to nnU-Net's."""
    from nnunetv2_cam_core.cli import main
    from nnunetv2_cam_core.demo import RESENC_PLANS, model_folder
    model = model_folder(results_dir, '3d_fullres', RESENC_PLANS)
    out = tmp_path / 'out'
    assert main(['-i', str(small_case), '-o', str(out), '-m', str(model), '-f', '0', '--target-class', '1',
                 '--target-region', 'all', '--target-layer', 'bottleneck', 'decoder.stages.0', '-device', 'cpu',
                 '--disable_tta', '--progress', 'none']) == 0
    side = json.loads((out / 'small_cam.json').read_text())
    assert side['layers'][0].startswith('encoder.stages.') and side['layers'][1] == 'decoder.stages.0'
    ref = nnunet_predict(model, small_case.parent, tmp_path / 'ref', [0], tta=False)
    ours = sitk.GetArrayFromImage(read(out / 'small.nii.gz'))
    theirs = sitk.GetArrayFromImage(read(ref / 'small.nii.gz'))
    assert_equals_nnunet(ours, theirs, logits_pair(model, [0], small_case))
    cam = sitk.GetArrayFromImage(read(out / 'small_cam_lesion_gradcam.nii.gz'))
    assert np.isfinite(cam).all() and cam.max() == pytest.approx(1.0)


def test_target_mask_leaves_the_network_input_alone(model3d, sample_case, tmp_path):
    """With use_mask_for_norm (z-score inside the nonzero region, as for skull-stripped MRI), a target mask over
    zero background must not join the normalisation: the input is the same with and without the mask. Where no
    background is in play, the mask lands exactly where nnU-Net's own preprocessing of a segmentation puts it."""
    import shutil
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.model import load_predictor
    model = tmp_path / model3d.name
    shutil.copytree(model3d, model)
    plans = json.loads((model / 'plans.json').read_text())
    conf = plans['configurations']['3d_fullres']
    conf['normalization_schemes'], conf['use_mask_for_norm'] = ['ZScoreNormalization'], [True]
    (model / 'plans.json').write_text(json.dumps(plans))
    img = read(sample_case)
    box = np.zeros(sitk.GetArrayFromImage(img).shape, np.uint8)
    box[8:22, 8:32, 8:32] = 1
    mask_path = tmp_path / 'mask.nii.gz'
    mask_img = sitk.GetImageFromArray(box)
    mask_img.CopyInformation(img)
    sitk.WriteImage(mask_img, str(mask_path))
    pred = load_predictor(model, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    assert pred.configuration_manager.use_mask_for_norm == [True]
    engine = CamEngine(pred)

    arr = sitk.GetArrayFromImage(img)
    arr[:20, :30, :30] = 0  # background in a corner of the nonzero region's box (not a hole nnU-Net fills)
    case = tmp_path / 'bg_0000.nii.gz'
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(case))
    assert torch.equal(engine.preprocess([str(case)])[0], engine.preprocess([str(case)], target_mask=str(mask_path))[0])

    _, _, mask, _ = engine.preprocess([str(sample_case)], target_mask=str(mask_path))
    rw = pred.plans_manager.image_reader_writer_class()
    raw, raw_props = rw.read_images([str(sample_case)])
    _, seg, _ = pred.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
        raw, box[None].astype(np.int8), raw_props, pred.plans_manager, pred.configuration_manager, pred.dataset_json)
    assert mask.any() and torch.equal(mask, torch.from_numpy(seg[0] > 0))


def test_out_of_memory_retry_is_reported(model3d, small_case, tmp_path, monkeypatch, capsys):
    """After an out-of-memory error the case finishes in low-memory mode; a warning says so and the sidecar records
    it."""
    from nnunetv2_cam_core.cli import main
    from nnunetv2_cam_core.sliding_window import _SlidingWindowRun
    original = _SlidingWindowRun._tile

    def tile(self, k, *args):
        if not self.low_memory:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return original(self, k, *args)
    monkeypatch.setattr(_SlidingWindowRun, '_tile', tile)
    out = tmp_path / 'out'
    assert main(['-i', str(small_case), '-o', str(out), '-m', str(model3d), '-f', '0', '--target-class', 'lesion',
                 '-device', 'cpu', '--disable_tta', '--progress', 'bar']) == 0
    assert json.loads((out / 'small_cam.json').read_text())['low_memory'] is True
    assert 'ran out of memory' in capsys.readouterr().err


@pytest.mark.parametrize('cores', [1, 2])
def test_a_map_compressed_in_pieces_reads_back_whole_everywhere(tmp_path, monkeypatch, cores):
    """On two cores or more a .nii.gz map is compressed in pieces at once (on one, by the image writer), into one
    gzip member: a reader that stops at the first member (web viewers' fflate) reads it whole, and so do
    SimpleITK, nibabel and Python's gzip, with its geometry."""
    import gzip
    import zlib
    import nibabel
    from nnunetv2_cam_core import export
    monkeypatch.setattr(export, 'compressing_cores', lambda: cores)
    arr = np.random.default_rng(0).random((48, 160, 160), dtype=np.float32)  # ~4.7 MB: two members at least
    props = {'sitk_stuff': {'spacing': (0.8, 0.9, 2.5), 'origin': (10.0, -5.0, 3.0),
                            'direction': (0, 1, 0, 1, 0, 0, 0, 0, -1.0)}}
    path = str(tmp_path / 'map.nii.gz')
    export.write_float_image(arr, path, props)
    assert [p.name for p in tmp_path.iterdir()] == ['map.nii.gz']  # no .nii left behind
    raw = Path(path).read_bytes()
    first = zlib.decompressobj(31)
    whole = first.decompress(raw)
    assert first.eof and first.unused_data == b''  # one member, and nothing after it
    assert len(whole) == 352 + arr.nbytes and whole[-arr.nbytes:] == arr.tobytes()
    img = sitk.ReadImage(path)
    assert np.array_equal(sitk.GetArrayFromImage(img), arr)
    assert np.allclose(img.GetSpacing(), (0.8, 0.9, 2.5)) and np.allclose(img.GetOrigin(), (10, -5, 3))
    assert np.allclose(img.GetDirection(), (0, 1, 0, 1, 0, 0, 0, 0, -1))
    assert np.array_equal(np.asarray(nibabel.load(path).dataobj).transpose(2, 1, 0), arr)
    assert gzip.decompress(raw)[-arr.nbytes:] == arr.tobytes()
