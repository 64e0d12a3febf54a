"""The CT-sized GPU case: a default 6-stage PlainConvUNet (features 32-320, patch 128^3, random weights) on a
256^3 case at 1 mm. Builds the model folder and the case itself (nothing to download), then runs the comparison
of benchmarks/run.py on it. Unattended, well under 10 minutes on one GPU:

    python benchmarks/gpu_ct.py --out benchmarks/results/gpu
    python benchmarks/gpu_ct.py --size 96 --patch 64 --device cpu --quick   # a smoke run without a GPU
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402

LABELS = {'background': 0, 'liver': 1, 'kidney': 2, 'tumor': 3}


def plans(patch: int) -> dict:
    n = 6
    feats = [min(32 * 2 ** i, 320) for i in range(n)]
    conf = {
        'data_identifier': 'nnUNetPlans_3d_fullres', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
        'patch_size': [patch] * 3, 'median_image_size_in_voxels': [256.0] * 3, 'spacing': [1.0, 1.0, 1.0],
        'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False],
        'resampling_fn_data': 'resample_data_or_seg_to_shape', 'resampling_fn_seg': 'resample_data_or_seg_to_shape',
        'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
        'resampling_fn_seg_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
        'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
        'resampling_fn_probabilities_kwargs': {'is_seg': False, 'order': 1, 'order_z': 0, 'force_separate_z': None},
        'architecture': {
            'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {'n_stages': n, 'features_per_stage': feats, 'conv_op': 'torch.nn.modules.conv.Conv3d',
                            'kernel_sizes': [[3, 3, 3]] * n, 'strides': [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                            'n_conv_per_stage': [2] * n, 'n_conv_per_stage_decoder': [2] * (n - 1),
                            'conv_bias': True, 'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                            'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None,
                            'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                            'nonlin_kwargs': {'inplace': True}},
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']},
        'batch_dice': False}
    return {'dataset_name': 'Dataset988_CTBench', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': [1.0, 1.0, 1.0],
            'original_median_shape_after_transp': [256, 256, 256], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'configurations': {'3d_fullres': conf},
            'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {
                'max': 1500.0, 'mean': 80.0, 'median': 70.0, 'min': -1000.0, 'percentile_00_5': -900.0,
                'percentile_99_5': 1200.0, 'std': 200.0}}}


def build_model(folder: Path, patch: int, folds=(0, 1)) -> Path:
    """A model folder nnU-Net loads as usual: plans.json, dataset.json and fold_N/checkpoint_final.pth."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    folder.mkdir(parents=True, exist_ok=True)
    p = plans(patch)
    dataset = {'channel_names': {'0': 'CT'}, 'labels': LABELS, 'numTraining': 0, 'file_ending': '.nii.gz'}
    (folder / 'plans.json').write_text(json.dumps(p))
    (folder / 'dataset.json').write_text(json.dumps(dataset))
    pm = PlansManager(p)
    for f in folds:
        torch.manual_seed(f)
        net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration('3d_fullres'), 1, len(LABELS), False)
        (folder / f'fold_{f}').mkdir(exist_ok=True)
        torch.save({'network_weights': net.state_dict(), 'trainer_name': 'nnUNetTrainer',
                    'init_args': {'configuration': '3d_fullres'}, 'inference_allowed_mirroring_axes': (0, 1, 2)},
                   folder / f'fold_{f}' / 'checkpoint_final.pth')
    return folder


def build_case(folder: Path, size: int) -> Path:
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    img = rng.normal(40, 20, (size,) * 3).astype(np.float32)
    zz, yy, xx = np.ogrid[:size, :size, :size]
    c = size / 2
    img[(zz - c) ** 2 + (yy - c) ** 2 + (xx - c * 0.8) ** 2 < (size / 5) ** 2] += 100
    im = sitk.GetImageFromArray(img)
    im.SetSpacing((1.0, 1.0, 1.0))
    path = folder / 'bench_0000.nii.gz'
    sitk.WriteImage(im, str(path))
    return path


def case_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark on this case: where to write, the device, the case's and the patch's size."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument('--out', type=Path, default=Path('benchmarks/results/gpu'))
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--size', type=int, default=256)
    ap.add_argument('--patch', type=int, default=128)
    return ap


def main(argv=None) -> int:
    ap = case_parser(__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='main rows only')
    ap.add_argument('--no-old-tool', action='store_true')
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / 'Dataset988_CTBench' / 'nnUNetTrainer__nnUNetPlans__3d_fullres', args.patch)
        case = build_case(work / 'case', args.size)
        from nnunetv2_cam_core.demo import default_cache
        old_py, why = (None, 'skipped (--no-old-tool)') if args.no_old_tool else \
            bench.old_tool_python(default_cache().parent)
        rows, machine = [], bench.machine_name(args.device)
        bench.bench_model(f'6-stage PlainConvUNet, {args.size}^3, patch {args.patch}^3', model, case, args.device,
                          rows, work / 'runs', old_py, why, args.quick,
                          on_row=lambda: bench.write_report(rows, [], args.out, machine))
    print((args.out / 'report.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
