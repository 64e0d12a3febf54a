"""Every other kind of nnU-Net model, on tiny models nnU-Net planned and trained (model_kinds.py): regions (sigmoid,
overlapping, KiTS-like regions_class_order), two input channels with an ignore label, natural-image PNG (RGB in one
file); and ResEnc's in-place residual add."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import assert_equals_nnunet, geometry, kind_model, logits_pair, nnunet_predict, read
from nnunetv2_cam_core.cli import main
from nnunetv2_cam_core.model_kinds import write_kind_case


def cam_run(model, case_dir, out, *args):
    return main(['-i', str(case_dir), '-o', str(out), '-m', str(model), '-device', 'cpu', '--disable_tta',
                 '--progress', 'none', *map(str, args)])


def channel_files(case_dir: Path):
    return sorted(str(f) for f in case_dir.iterdir() if f.is_file())


def last_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


# --- regions ---
@pytest.fixture(scope='session')
def regions_model() -> Path:
    return kind_model('regions')


@pytest.fixture(scope='session')
def regions_run(regions_model, tmp_path_factory):
    case_dir = write_kind_case('regions', tmp_path_factory.mktemp('regions_case'))
    out = tmp_path_factory.mktemp('regions_out')
    assert cam_run(regions_model, case_dir, out, '--target-class', 'kidney', 'masses', 'tumor', '--target-layer',
                   'last_decoder', '--method', 'hirescam') == 0
    return case_dir, out


def test_region_names_resolve_to_nnunets_own_region_channels(regions_model):
    """KiTS23's case: 'masses' lists label 2 first but is painted 3 (regions_class_order 1, 3, 2)."""
    from nnunetv2_cam_core.model import load_predictor
    from nnunetv2_cam_core.targets import resolve_targets
    pred = load_predictor(regions_model, [0], 'checkpoint_final.pth', torch.device('cpu'))
    lm = pred.label_manager
    targets = resolve_targets(lm, pred.dataset_json, ['kidney', 'masses', 'tumor'])
    for t in targets:
        region = lm.foreground_regions[t.channel]
        assert set(np.atleast_1d(region).tolist()) == set(t.labels), (t, region)
        assert t.label == lm.regions_class_order[t.channel]
    assert [t.channel for t in targets] == [0, 1, 2] and [t.label for t in targets] == [1, 3, 2]
    # by the value the segmentation file holds
    assert resolve_targets(lm, pred.dataset_json, ['3'])[0].name == 'masses'


def test_region_segmentation_equals_nnunet_with_the_input_geometry(regions_model, regions_run, tmp_path):
    case_dir, out = regions_run
    ref = nnunet_predict(regions_model, case_dir, tmp_path / 'ref', [0], tta=False)
    ours = sitk.GetArrayFromImage(read(out / 'case.nii.gz'))
    theirs = sitk.GetArrayFromImage(read(ref / 'case.nii.gz'))
    assert set(np.unique(theirs)) == {0, 1, 2, 3}, 'the reference misses a region: model too weak for the test'
    differing, eps = assert_equals_nnunet(ours, theirs, logits_pair(regions_model, [0], channel_files(case_dir)))
    print(f'\nregions: {differing} voxels differ from nnUNetv2_predict, logits by {eps:.3g}')
    side = json.loads((out / 'case_cam.json').read_text())
    for name in ('kidney', 'masses', 'tumor'):
        assert geometry(read(out / side['cams'][name])) == geometry(read(case_dir / 'case_0000.nii.gz'))


def test_overlapping_regions_each_get_their_own_map(regions_run):
    """The sidecar counts a region's voxels (every label it covers), and each region's map lies more on its own
    region than the other region's map does."""
    _, out = regions_run
    side = json.loads((out / 'case_cam.json').read_text())
    seg = sitk.GetArrayFromImage(read(out / 'case.nii.gz'))
    regions = {'kidney': [1, 2, 3], 'masses': [2, 3], 'tumor': [2]}
    maps = {}
    for name, labels in regions.items():
        st = side['classes'][name]
        inside = np.isin(seg, labels)
        assert st['labels'] == labels and st['predicted_voxels'] == int(inside.sum()) > 0
        maps[name] = sitk.GetArrayFromImage(read(out / side['cams'][name]))
        assert np.isfinite(maps[name]).all() and maps[name].min() >= 0 and maps[name].max() == pytest.approx(1)
        assert st['energy_in_predicted_mask'] == pytest.approx(maps[name][inside].sum() / maps[name].sum(), rel=1e-5)
    assert (np.isin(seg, regions['masses']) <= np.isin(seg, regions['kidney'])).all()  # nested: they overlap

    def share(m, region):
        return maps[m][region].sum() / maps[m].sum()
    masses, kidney_only = np.isin(seg, [2, 3]), seg == 1
    assert share('masses', masses) > share('kidney', masses)
    assert share('kidney', kidney_only) > share('masses', kidney_only)
    assert not np.allclose(maps['kidney'], maps['masses'], atol=0.05)


def test_unknown_region_name_is_one_line(regions_model, regions_run, tmp_path, capsys):
    case_dir, _ = regions_run
    capsys.readouterr()
    assert cam_run(regions_model, case_dir, tmp_path / 'out', '--target-class', 'whole') == 2
    line = last_line_error(capsys)
    assert "'whole'" in line and '1 (kidney), 3 (masses), 2 (tumor)' in line
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


# --- two channels, ignore label ---
@pytest.fixture(scope='session')
def two_channel_model() -> Path:
    return kind_model('multichannel')


@pytest.fixture(scope='session')
def two_channel_run(two_channel_model, tmp_path_factory):
    case_dir = write_kind_case('multichannel', tmp_path_factory.mktemp('two_channel_case'))
    out = tmp_path_factory.mktemp('two_channel_out')
    assert cam_run(two_channel_model, case_dir, out, '--target-class', 'lesion', 'cyst', '--target-layer',
                   'last_decoder', '--method', 'hirescam', '--channel-attribution') == 0
    return case_dir, out


def test_two_channel_model_matches_nnunet_and_never_explains_the_ignore_label(two_channel_model, two_channel_run,
                                                                             tmp_path, capsys):
    from nnunetv2_cam_core.model import describe_model
    case_dir, out = two_channel_run
    ref = nnunet_predict(two_channel_model, case_dir, tmp_path / 'ref', [0], tta=False)
    ours = sitk.GetArrayFromImage(read(out / 'case.nii.gz'))
    theirs = sitk.GetArrayFromImage(read(ref / 'case.nii.gz'))
    assert set(np.unique(theirs)) == {0, 1, 2}, 'the reference misses a class: model too weak for the test'
    assert_equals_nnunet(ours, theirs, logits_pair(two_channel_model, [0], channel_files(case_dir)))
    # the ignore label is no class: not offered, not accepted, and --target-region all covers the real ones only
    assert cam_run(two_channel_model, case_dir, tmp_path / 'all', '--target-class', 'lesion', 'cyst',
                   '--target-region', 'all') == 0
    info = describe_model(two_channel_model)
    assert info['classes'] == ['lesion', 'cyst'] and info['channels'] == ['T1', 'T2']
    side = json.loads((out / 'case_cam.json').read_text())
    assert set(side['cams']) == {'lesion', 'cyst'}
    maps = [sitk.GetArrayFromImage(read(out / side['cams'][n])) for n in ('lesion', 'cyst')]
    assert all(np.isfinite(m).all() and 0 <= m.min() and m.max() <= 1 for m in maps)
    assert not np.allclose(maps[0], maps[1], atol=0.05)
    for spec in ('ignore', '3'):
        capsys.readouterr()
        assert cam_run(two_channel_model, case_dir, tmp_path / 'bad', '--target-class', spec) == 2
        assert 'ignore label' in last_line_error(capsys)


def test_channel_attribution_names_the_channel_that_shows_the_class(two_channel_run, two_channel_model, tmp_path,
                                                                   capsys):
    """T2 alone shows the lesion, T1 alone the cyst: each class's |gradient x input| comes mostly from its channel."""
    case_dir, out = two_channel_run
    side = json.loads((out / 'case_cam.json').read_text())
    shares = {name: side['classes'][name]['channel_attribution'] for name in ('lesion', 'cyst')}
    print(f'\nchannel attribution: {shares}')
    for name, channel in (('lesion', 'T2'), ('cyst', 'T1')):
        assert set(shares[name]) == {'T1', 'T2'} and sum(shares[name].values()) == pytest.approx(1)
        assert shares[name][channel] > 0.5, (name, shares[name])
    # one graph at a time: the same sums
    assert cam_run(two_channel_model, case_dir, tmp_path / 'low', '--target-class', 'lesion', 'cyst', '--target-layer',
                   'last_decoder', '--method', 'hirescam', '--channel-attribution', '--low-memory') == 0
    low = json.loads((tmp_path / 'low' / 'case_cam.json').read_text())
    for name in shares:
        for channel, share in low['classes'][name]['channel_attribution'].items():
            assert share == pytest.approx(shares[name][channel], abs=1e-6)
    capsys.readouterr()
    assert cam_run(two_channel_model, case_dir, tmp_path / 'x', '--method', 'eigencam', '--channel-attribution') == 2
    assert 'needs gradients' in last_line_error(capsys)


def test_two_channel_model_given_one_channel_is_one_line(two_channel_model, two_channel_run, tmp_path, capsys):
    case_dir, _ = two_channel_run
    capsys.readouterr()
    assert main(['-i', str(case_dir / 'case_0000.nii.gz'), '-o', str(tmp_path / 'out'), '-m', str(two_channel_model),
                 '-device', 'cpu', '--progress', 'none']) == 2
    line = last_line_error(capsys)
    assert 'case_0001 (T2)' in line and '2 channel(s)' in line


# --- natural images ---
@pytest.fixture(scope='session')
def png_model() -> Path:
    return kind_model('png')


def test_rgb_png_model_writes_16_bit_png_maps(png_model, tmp_path):
    """One RGB file holds the three channels; maps are 16-bit PNGs (0..65535 for 0..1) plus the exact .npy."""
    from PIL import Image
    case_dir = write_kind_case('png', tmp_path / 'case')
    out = tmp_path / 'out'
    assert cam_run(png_model, case_dir, out, '--target-class', 'red', 'blue', '--save-raw') == 0
    ref = nnunet_predict(png_model, case_dir, tmp_path / 'ref', [0], tta=False)
    ours, theirs = (np.asarray(Image.open(d / 'case.png'))[None] for d in (out, ref))
    assert set(np.unique(theirs)) == {0, 1, 2}, 'the reference misses a class: model too weak for the test'
    assert_equals_nnunet(ours, theirs, logits_pair(png_model, [0], channel_files(case_dir)))
    side = json.loads((out / 'case_cam.json').read_text())
    assert side['cam_format'] == 'png' and side['cams'] == {'red': 'case_cam_red_gradcam.png',
                                                            'blue': 'case_cam_blue_gradcam.png'}
    maps = {}
    for name, file in side['cams'].items():
        png = np.asarray(Image.open(out / file))
        exact = np.load(out / file.replace('.png', '.npy'))
        assert png.dtype == np.uint16 and png.shape == exact.shape == ours.shape[1:]
        assert np.isfinite(exact).all() and 0 <= exact.min() and exact.max() == pytest.approx(1)
        assert np.abs(png / 65535 - exact).max() <= 0.5 / 65535 + 1e-7
        assert np.load(out / f'case_camraw_{name}_gradcam.npy').max() == pytest.approx(side['classes'][name]['raw_max'])
        maps[name] = exact
    assert not np.allclose(maps['red'], maps['blue'], atol=0.05)


def test_tiff_maps_and_unwritable_formats(tmp_path):
    """Tiff3DIO: a float32 TIFF with nnU-Net's spacing .json; a reader-writer without geometry fails before work."""
    import tifffile
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO
    from nnunetv2_cam_core.errors import UsageError
    from nnunetv2_cam_core.export import cam_format, write_map
    from nnunetv2_cam_core.outputs import CaseOutputs
    props = {'spacing': [2.0, 0.5, 0.5]}
    assert cam_format(Tiff3DIO(), props) == 'tiff'
    arr = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)  # a map in the original geometry
    with CaseOutputs(tmp_path) as co:
        assert write_map(arr, co, 'c_cam_x', '.tif', props, 'tiff') == 'c_cam_x.tif'
        co.commit()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / 'c_cam_x.tif'), arr)
    data, read_props = Tiff3DIO().read_seg(str(tmp_path / 'c_cam_x.tif'))  # as nnU-Net reads its own outputs
    np.testing.assert_array_equal(data[0], arr)
    assert read_props['spacing'] == [2.0, 0.5, 0.5]

    class CustomIO:
        pass
    with pytest.raises(UsageError, match='CustomIO'):
        cam_format(CustomIO(), {'spacing': (1, 1, 1)})


# --- ResEnc: conv2's output is changed in place by the residual add ---
def test_resenc_block_outputs_are_captured_as_the_layer_returned_them(tmp_path):
    """`out += residual` follows conv2 in every ResEnc block: the captured output stays conv2's own, as the first
    (cut) layer and further up the graph, gradients reach it, and gradcam (which crashed) and eigencam (which
    used conv2 + residual) run on such a layer."""
    from nnunetv2_cam_core.layers import LayerCapture
    from nnunetv2_cam_core.model import fold_networks, load_predictor
    model = kind_model('resenc')  # trained: an untrained block's conv2 is all zeros (its last norm starts at 0)
    case_dir = write_kind_case('resenc', tmp_path / 'case')
    pred = load_predictor(model, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    net = fold_networks(pred)[0]
    name = next(n for n, _ in net.named_modules() if n.startswith('encoder.stages.1.blocks.') and n.endswith('conv2'))
    x = torch.randn(1, 1, *pred.configuration_manager.patch_size)
    for layers in ([name], ['encoder.stages.0', name]):
        seen = {}

        def record(module, inputs, output):  # registered first: sees conv2's output before anything else
            seen['out'] = output.detach().clone()
        handle = dict(net.named_modules())[name].register_forward_hook(record)
        with LayerCapture(net, layers) as cap, torch.enable_grad():
            out = net(x)
            grad, = torch.autograd.grad(out[0, 1].sum(), [cap.outputs[name]])
        handle.remove()
        torch.testing.assert_close(cap.outputs[name].detach(), seen['out'], rtol=0, atol=0)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for method in ('gradcam', 'eigencam'):
        out = tmp_path / method
        assert cam_run(model, case_dir, out, '--target-class', 'kidney', '--target-layer', name, '--method',
                       method) == 0
        cam = sitk.GetArrayFromImage(read(out / f'case_cam_kidney_{method}.nii.gz'))
        assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() == pytest.approx(1.0)


# --- the cascade: 3d_lowres -> 3d_cascade_fullres ---
@pytest.fixture(scope='session')
def cascade_model() -> Path:
    """The 3d_cascade_fullres folder; its 3d_lowres folder is next to it."""
    return kind_model('cascade')


@pytest.fixture(scope='session')
def cascade_case(cascade_model, tmp_path_factory):
    """A case, and its low-resolution segmentation from nnUNetv2_predict."""
    case_dir = write_kind_case('cascade', tmp_path_factory.mktemp('cascade_case'))
    lowres = cascade_model.parent / 'nnUNetTrainer__nnUNetPlans__3d_lowres'
    prev = nnunet_predict(lowres, case_dir, tmp_path_factory.mktemp('lowres'), ['all'], tta=False)
    return case_dir, prev


def test_cascade_with_previous_stage_predictions_equals_nnunets_cascade(cascade_model, cascade_case, tmp_path):
    case_dir, prev = cascade_case
    out = tmp_path / 'out'
    assert cam_run(cascade_model, case_dir, out, '-prev_stage_predictions', prev, '--target-class', 'kidney',
                   'tumor') == 0
    ref = nnunet_predict(cascade_model, case_dir, tmp_path / 'ref', [0], tta=False, prev_stage=prev)
    ours = sitk.GetArrayFromImage(read(out / 'case.nii.gz'))
    theirs = sitk.GetArrayFromImage(read(ref / 'case.nii.gz'))
    assert {1, 2} <= set(np.unique(theirs)), 'the reference misses a class: model too weak for the test'
    assert_equals_nnunet(ours, theirs, logits_pair(cascade_model, [0], channel_files(case_dir),
                                                   prev_stage=str(prev / 'case.nii.gz')))
    side = json.loads((out / 'case_cam.json').read_text())
    # the previous stage's one-hot channels are inputs, not images
    assert side['input_channels'] == ['CT', 'previous stage: kidney', 'previous stage: tumor', 'previous stage: cyst']
    assert side['previous_stage'] is None
    maps = [sitk.GetArrayFromImage(read(out / side['cams'][n])) for n in ('kidney', 'tumor')]
    assert all(np.isfinite(m).all() and 0 <= m.min() and m.max() == pytest.approx(1) for m in maps)
    assert not np.allclose(maps[0], maps[1], atol=0.05)
    assert geometry(read(out / side['cams']['kidney'])) == geometry(read(case_dir / 'case_0000.nii.gz'))


def test_cascade_runs_its_low_resolution_stage_by_itself(cascade_model, cascade_case, tmp_path, capsys):
    """Pointed at the cascade's folder alone, the CLI runs the 3d_lowres model next to it first, as nnU-Net would,
    and keeps nothing of it: the same segmentation as the two-step run."""
    case_dir, prev = cascade_case
    two_step, auto = tmp_path / 'two_step', tmp_path / 'auto'
    assert cam_run(cascade_model, case_dir, two_step, '-prev_stage_predictions', prev, '--target-class', 'kidney') == 0
    capsys.readouterr()
    assert main(['-i', str(case_dir), '-o', str(auto), '-m', str(cascade_model), '--target-class', 'kidney',
                 '-device', 'cpu', '--disable_tta', '--progress', 'json']) == 0
    stages = [e['stage'] for e in map(json.loads, capsys.readouterr().out.splitlines()) if e['event'] == 'stage']
    assert stages.index('previous_stage') < stages.index('preprocess') < stages.index('tiles')
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read(auto / 'case.nii.gz')),
                                  sitk.GetArrayFromImage(read(two_step / 'case.nii.gz')))
    side = json.loads((auto / 'case_cam.json').read_text())
    assert side['previous_stage'] == {'model': str(cascade_model.parent / 'nnUNetTrainer__nnUNetPlans__3d_lowres'),
                                      'folds': ['all']}
    assert sorted(f.name for f in auto.iterdir() if f.name.startswith('.')) == []


def test_cascade_layer_list_says_which_input_channels_are_images(cascade_model, capsys):
    capsys.readouterr()
    assert main(['--list-layers', '-m', str(cascade_model), '-device', 'cpu']) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ('input channels: CT (images); previous stage: kidney, previous stage: tumor, '
                     'previous stage: cyst (one-hot, not images)')


def test_cascade_without_its_low_resolution_model_is_one_line(cascade_model, cascade_case, tmp_path, capsys):
    import shutil
    alone = tmp_path / 'Dataset985_TinyCascade' / cascade_model.name
    shutil.copytree(cascade_model, alone)
    case_dir, _ = cascade_case
    capsys.readouterr()
    assert cam_run(alone, case_dir, tmp_path / 'out', '--target-class', 'kidney') == 2
    line = last_line_error(capsys)
    assert '3d_lowres' in line and '-prev_stage_predictions' in line


# --- building the tiny models ---
def test_model_builds_show_one_line_per_model_and_name_their_log_on_failure(tmp_path, capsys):
    import io
    from nnunetv2_cam_core.demo import BuildProgress, build_once

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stream in (Terminal(), io.StringIO()):
        progress = BuildProgress('tiny models', 2, stream)
        for name in ('3d_fullres fold 0', '2d fold 0'):
            epoch = progress.start(name)
            for done in (1, 2, 3):
                epoch(done, 3, 2.0 * done)
        lines = [line.rstrip() for line in stream.getvalue().replace('\r', '\n').split('\n')]
        assert any(line.startswith('tiny models: model 1/2 (3d_fullres fold 0): trained in 6 s') for line in lines)
        assert any(line.startswith('tiny models: model 2/2 (2d fold 0): trained in 6 s') for line in lines)
        if isinstance(stream, Terminal):  # a live line: epochs and the time left, overwritten in place
            assert 'tiny models: model 1/2 (3d_fullres fold 0): epoch 1/3, about 4 s left' in lines
        else:  # a log file or CI: no per-epoch lines
            assert len([line for line in lines if line.strip()]) == 4

    def steps(raw):
        print('nnU-Net planning output')
        raise RuntimeError('the planner crashed')
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        build_once(tmp_path / 'models', 'tiny test model', steps)
    out = capsys.readouterr()
    log = tmp_path / 'models.build.log'
    assert f"nnU-Net's log: {log}" in out.err and 'the planner crashed' in out.err
    assert 'nnU-Net planning output' in log.read_text() and 'nnU-Net planning output' not in out.out
    assert [p.name for p in tmp_path.iterdir()] == ['models.build.log']  # nothing half-built
