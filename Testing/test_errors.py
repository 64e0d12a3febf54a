"""Bad input: a one-line message naming the problem and the fix, exit 2 (usage) or 1 (run), nothing partial left."""
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_cam_core.cli import main


def run(capsys, args):
    rc = main([str(a) for a in args] + ['--progress', 'none'])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else '')


def base(model, case, out):
    return ['-i', case, '-o', out, '-m', model, '-f', '0', '-device', 'cpu', '--disable_tta']


def assert_clean(out):
    assert not out.exists() or not any(out.iterdir()), f'partial output left: {list(out.iterdir())}'


def test_missing_model_folder(capsys, sample_case, tmp_path):
    rc, msg = run(capsys, base(tmp_path / 'nope', sample_case, tmp_path / 'out'))
    assert rc == 2 and 'does not exist' in msg and 'dataset.json' in msg


def test_incomplete_model_folder(capsys, model3d, sample_case, tmp_path):
    broken = tmp_path / 'model'
    shutil.copytree(model3d, broken)
    (broken / 'plans.json').unlink()
    rc, msg = run(capsys, base(broken, sample_case, tmp_path / 'out'))
    assert rc == 2 and 'incomplete' in msg and 'plans.json' in msg


def test_missing_fold_checkpoint(capsys, model3d, sample_case, tmp_path):
    args = base(model3d, sample_case, tmp_path / 'out')
    args[args.index('-f') + 1] = '3'
    rc, msg = run(capsys, args)
    assert rc == 2 and 'fold 3' in msg and 'available: 0 1' in msg


def test_corrupt_checkpoint(capsys, model3d, sample_case, tmp_path):
    broken = tmp_path / 'model'
    shutil.copytree(model3d, broken)
    (broken / 'fold_0' / 'checkpoint_final.pth').write_bytes(b'not a checkpoint')
    rc, msg = run(capsys, base(broken, sample_case, tmp_path / 'out'))
    assert rc == 1 and 'could not load the model' in msg


def test_extra_channel(capsys, model3d, sample_case, tmp_path):
    d = tmp_path / 'in'
    d.mkdir()
    shutil.copy(sample_case, d / 'case_0000.nii.gz')
    shutil.copy(sample_case, d / 'case_0001.nii.gz')
    rc, msg = run(capsys, base(model3d, d, tmp_path / 'out'))
    assert rc == 2 and 'extra channel 0001' in msg
    assert_clean(tmp_path / 'out')


def test_missing_channel(capsys, model3d, sample_case, tmp_path):
    d = tmp_path / 'in'
    d.mkdir()
    shutil.copy(sample_case, d / 'case_0001.nii.gz')
    rc, msg = run(capsys, base(model3d, d, tmp_path / 'out'))
    assert rc == 2 and 'missing channel case_0000' in msg


def test_channels_grouped_by_exact_case_id(tmp_path):
    from nnunetv2_cam_core.inputs import find_cases
    d = tmp_path
    for n in ('case_001_0000.nii.gz', 'case_0010_0000.nii.gz'):
        (d / n).write_bytes(b'')
    cases = find_cases([str(d)], ['.nii.gz', '.nrrd'], {'0': 'T1'})
    assert set(cases) == {'case_001', 'case_0010'}
    assert cases['case_001'] == [str(d / 'case_001_0000.nii.gz')]


def test_corrupt_image(capsys, model3d, tmp_path):
    bad = tmp_path / 'bad_0000.nii.gz'
    bad.write_bytes(b'\x1f\x8b garbage')
    rc, msg = run(capsys, base(model3d, bad, tmp_path / 'out'))
    assert rc == 2 and 'cannot read' in msg
    assert_clean(tmp_path / 'out')


def test_wrong_dimensions(capsys, model3d, tmp_path):
    img = sitk.GetImageFromArray(np.ones((2, 8, 16, 16), np.float32), isVector=False)
    path = tmp_path / 'fourd_0000.nii.gz'
    sitk.WriteImage(img, str(path))
    rc, msg = run(capsys, base(model3d, path, tmp_path / 'out'))
    assert rc == 2 and '4 dimensions' in msg


def test_2d_image_for_3d_model(capsys, model3d, tmp_path):
    path = tmp_path / 'flat_0000.nii.gz'
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16), np.float32)), str(path))
    rc, msg = run(capsys, base(model3d, path, tmp_path / 'out'))
    assert rc == 2 and '2D image but this is a 3D model' in msg


def test_nan_voxels(capsys, model3d, sample_case, tmp_path):
    img = sitk.ReadImage(str(sample_case))
    arr = sitk.GetArrayFromImage(img)
    arr[5, 5, 5] = np.nan
    arr[6, 6, 6] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    path = tmp_path / 'nan_0000.nrrd'  # SimpleITK's NIfTI IO turns NaN into 0; NRRD keeps it
    sitk.WriteImage(out, str(path))
    rc, msg = run(capsys, base(model3d, path, tmp_path / 'out'))
    assert rc == 2 and '2 NaN/inf voxels' in msg


def test_unknown_layer_lists_closest(capsys, model3d, sample_case, tmp_path):
    rc, msg = run(capsys, base(model3d, sample_case, tmp_path / 'out') + ['--target-layer', 'encoder.stages.4.0'])
    assert rc == 2 and 'unknown target layer' in msg and 'encoder.stages.' in msg.split('closest:')[1]


@pytest.mark.parametrize('cls', ['7', 'liver'])
def test_unknown_class_or_label(capsys, model3d, sample_case, tmp_path, cls):
    rc, msg = run(capsys, base(model3d, sample_case, tmp_path / 'out') + ['--target-class', cls])
    assert rc == 2 and 'unknown target class' in msg and '1 (lesion)' in msg and '2 (organ)' in msg


def test_method_not_available(capsys, model3d, sample_case, tmp_path):
    rc, msg = run(capsys, base(model3d, sample_case, tmp_path / 'out') + ['--method', 'ablationcam'])
    assert rc == 2 and 'not available' in msg and '2D-only' in msg


def test_pool_size_only_for_segxrescam(capsys, model3d, sample_case, tmp_path):
    rc, msg = run(capsys, base(model3d, sample_case, tmp_path / 'out') + ['--pool-size', '2'])
    assert rc == 2 and 'only applies to segxrescam' in msg


def test_mask_geometry_mismatch(capsys, model3d, sample_case, tmp_path):
    img = sitk.ReadImage(str(sample_case))
    mask = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(img)
    mask.SetOrigin([o + 5 for o in img.GetOrigin()])
    mask[10, 10, 10] = 1
    path = tmp_path / 'mask.nii.gz'
    sitk.WriteImage(mask, str(path))
    rc, msg = run(capsys, base(model3d, sample_case, tmp_path / 'out') + ['--target-mask', path])
    assert rc == 2 and 'does not match the image geometry' in msg
    assert_clean(tmp_path / 'out')


def test_mask_outside_the_nonzero_region(capsys, model3d, sample_case, tmp_path):
    """A mask only on the zero border, which nnU-Net crops away: no silent zero map."""
    img = sitk.ReadImage(str(sample_case))
    mask = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(img)
    mask[0, 0, 0] = 1
    path = tmp_path / 'mask.nii.gz'
    sitk.WriteImage(mask, str(path))
    rc, msg = run(capsys, base(model3d, sample_case, tmp_path / 'out') + ['--target-mask', path])
    assert rc == 2 and 'outside the image\'s nonzero region' in msg and 'larger region' in msg
    assert_clean(tmp_path / 'out')


def test_output_not_writable(capsys, model3d, sample_case, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    rc, msg = run(capsys, base(model3d, sample_case, blocker / 'out'))
    assert rc == 2 and 'not writable' in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_requested_without_cuda(capsys, model3d, sample_case, tmp_path):
    args = base(model3d, sample_case, tmp_path / 'out')
    args[args.index('-device') + 1] = 'cuda'
    rc, msg = run(capsys, args)
    assert rc == 2 and 'CUDA was requested' in msg and '-device cpu' in msg


def test_cascade_without_previous_stage(capsys, model3d, sample_case, tmp_path):
    import json
    casc = tmp_path / 'model'
    shutil.copytree(model3d, casc)
    plans = json.loads((casc / 'plans.json').read_text())
    plans['configurations']['3d_fullres']['previous_stage'] = '3d_lowres'
    (casc / 'plans.json').write_text(json.dumps(plans))
    rc, msg = run(capsys, base(casc, sample_case, tmp_path / 'out'))
    assert rc == 2 and 'cascade' in msg and '-prev_stage_predictions' in msg


def test_one_line_messages(capsys, model3d, sample_case, tmp_path):
    main([str(a) for a in base(model3d, sample_case, tmp_path / 'out')] + ['--target-class', 'liver', '--progress',
                                                                            'none'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ')


@pytest.mark.parametrize('extra, expected', [
    (['--eval-steps', '0'], '--eval-steps must be 1 or more'),
    (['--method', 'scorecam'], "method 'scorecam' is not available"),
    (['--eval-seeds', '0'], '--eval-seeds must be 1 or more'),
])
def test_bad_evaluation_options(capsys, model3d, small_case, tmp_path, extra, expected):
    rc, msg = run(capsys, base(model3d, small_case, tmp_path / 'out') + ['--evaluate', *extra])
    assert rc == 2 and expected in msg
    assert_clean(tmp_path / 'out')


def test_reference_mask_of_another_geometry_or_without_evaluate(capsys, model3d, small_case, sample_case, tmp_path):
    other = sample_case.parent / 'labels' / 'sample.nii.gz'
    rc, msg = run(capsys, base(model3d, small_case, tmp_path / 'out') + ['--evaluate', '--reference-mask', other])
    assert rc == 2 and 'reference mask' in msg and 'does not match the image geometry' in msg
    assert_clean(tmp_path / 'out')
    rc, msg = run(capsys, base(model3d, small_case, tmp_path / 'out') + ['--reference-mask', other])
    assert rc == 2 and 'add --evaluate' in msg


def test_fold_spread_needs_two_folds(capsys, model3d, small_case, tmp_path):
    rc, msg = run(capsys, base(model3d, small_case, tmp_path / 'out') + ['--save-fold-spread'])
    assert rc == 2 and 'two or more' in msg and '-f 0 1' in msg
