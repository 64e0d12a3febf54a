"""Find and load a trained nnU-Net v2 model: folder, folds, checkpoint, device, one network per fold.
Imports no torch at module level: the Slicer module reads model folders with it in Slicer's own Python."""
import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .errors import CamError, UsageError
from .labels import has_regions, output_classes

MIN_STEP = 0.1  # -step_size: nnU-Net uses 0.5; below 0.1 a case's tiles grow past any use (1e-4: 3e12 on a CT)


def resolve_model_folder(model: Optional[str] = None, dataset: Optional[str] = None,
                         configuration: Optional[str] = None, trainer: str = 'nnUNetTrainer',
                         plans: str = 'nnUNetPlans') -> Path:
    """-m FOLDER, or nnU-Net style -d DATASET -c CONFIG [-tr TRAINER] [-p PLANS] under $nnUNet_results."""
    if model:
        folder = Path(model)
    elif dataset and configuration:
        results = os.environ.get('nnUNet_results')
        if not results:
            raise UsageError('-d/-c need $nnUNet_results; set it to your nnU-Net results folder or pass -m MODEL_FOLDER')
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        try:
            name = maybe_convert_to_dataset_name(dataset)
        except RuntimeError:
            raise UsageError(f'dataset {dataset!r} not found under $nnUNet_results or $nnUNet_raw/$nnUNet_preprocessed; '
                             f'check -d or pass -m MODEL_FOLDER') from None
        folder = Path(results) / name / f'{trainer}__{plans}__{configuration}'
    else:
        raise UsageError('no model given; pass -m MODEL_FOLDER or -d DATASET -c CONFIGURATION')
    if not folder.is_dir():
        raise UsageError(f'model folder {folder} does not exist; pass the folder that holds dataset.json, '
                         f'plans.json and fold_N/')
    missing = [f for f in ('dataset.json', 'plans.json') if not (folder / f).is_file()]
    if missing:
        raise UsageError(f'model folder {folder} is incomplete: {" and ".join(missing)} missing; pass the '
                         f'trainer output folder (e.g. .../nnUNetTrainer__nnUNetPlans__3d_fullres)')
    return folder


def configuration_of(folder: Path, fold, checkpoint: str) -> Optional[str]:
    """From the folder name TRAINER__PLANS__CONFIGURATION, else from the checkpoint (as nnU-Net does); None if
    neither tells (loading will then report the problem)."""
    parts = folder.name.split('__')
    if len(parts) == 3:
        return parts[2]
    import torch
    try:
        ckpt = torch.load(folder / f'fold_{fold}' / checkpoint, map_location='cpu', weights_only=False, mmap=True)
        return ckpt['init_args']['configuration']
    except Exception:
        return None


def require_previous_stage(previous_stage: Optional[str], given: Optional[str]) -> None:
    if previous_stage and not given:
        raise UsageError(f'this model is a cascade stage: pass the {previous_stage} segmentations with '
                         f'-prev_stage_predictions FOLDER (one CASE file per case, named like the images\' case id)')


def previous_stage_of(folder: Path, configuration: Optional[str]) -> Optional[str]:
    """The configuration a cascade stage follows (plans.json), None for any other model."""
    plans = json.loads((folder / 'plans.json').read_text())
    return plans.get('configurations', {}).get(configuration, {}).get('previous_stage')


def available_folds(folder: Path, checkpoint: str) -> List[Union[int, str]]:
    out = []
    for d in sorted(folder.glob('fold_*')):
        if (d / checkpoint).is_file():
            f = d.name[len('fold_'):]
            out.append(int(f) if f.isdigit() else f)
    return out


def describe_model(folder: Union[str, Path], checkpoint: str = 'checkpoint_final.pth') -> dict:
    """What a user picks from: configuration, trained folds, labels, the classes or regions it can explain (output
    order; never the background or the ignore label) and input channels (from dataset.json)."""
    folder = resolve_model_folder(str(folder))
    dataset = json.loads((folder / 'dataset.json').read_text())
    plans = json.loads((folder / 'plans.json').read_text())
    parts = folder.name.split('__')
    configuration = parts[2] if len(parts) == 3 else None
    channels = dataset.get('channel_names', dataset.get('modality', {}))
    classes = output_classes(dataset)
    return {'folder': str(folder), 'dataset': plans.get('dataset_name', folder.parent.name),
            'trainer': parts[0] if len(parts) == 3 else None, 'configuration': configuration,
            'folds': available_folds(folder, checkpoint),
            'labels': dataset['labels'], 'classes': list(classes),
            'regions': {n: list(v) for n, (_, v) in classes.items()} if has_regions(dataset) else None,
            'channels': [channels[k] for k in sorted(channels, key=int)],
            'file_ending': dataset.get('file_ending', '.nii.gz'),
            'previous_stage': plans.get('configurations', {}).get(configuration, {}).get('previous_stage')}


def resolve_folds(folder: Path, folds: Optional[Sequence[str]], checkpoint: str) -> List[Union[int, str]]:
    """-f 0 1 ... or -f all; None means every fold that has the checkpoint."""
    have = available_folds(folder, checkpoint)
    if not folds:
        if not have:
            raise UsageError(f'no fold_N/{checkpoint} in {folder}; train a fold first or pass -chk with the '
                             f'checkpoint you have')
        return have
    wanted = [f if f == 'all' else int(f) for f in folds] if all(str(f) == 'all' or str(f).isdigit() for f in folds) \
        else None
    if wanted is None:
        raise UsageError(f'folds must be integers or "all", got {" ".join(map(str, folds))}')
    wanted = list(dict.fromkeys(wanted))  # a fold named twice is one fold
    for f in wanted:
        if f not in have:
            raise UsageError(f'fold {f} has no {checkpoint} in {folder}; available: '
                             f'{" ".join(map(str, have)) or "none"}; pass -f with those or -chk another checkpoint')
    return wanted


def resolve_device(name: str) -> 'torch.device':
    import torch
    name = (name or 'auto').lower()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UsageError('CUDA was requested (-device cuda) but torch finds no CUDA device; use -device cpu, or '
                         'install a CUDA build of torch that matches your driver')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise UsageError('MPS was requested (-device mps) but is not available; use -device cpu')
    if name not in ('cpu', 'mps') and not name.startswith('cuda'):
        raise UsageError(f'unknown device {name!r}; use auto, cuda, cpu or mps')
    return torch.device(name)


def load_predictor(folder: Path, folds: Sequence, checkpoint: str, device: 'torch.device', step_size: float = 0.5,
                   use_mirroring: bool = True):
    """nnU-Net's own predictor, initialised from the model folder."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    if not MIN_STEP <= step_size <= 1:
        raise UsageError(f'-step_size must be in [{MIN_STEP}, 1] (nnU-Net uses 0.5), got {step_size}')
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notices are not our output
            predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                        perform_everything_on_device=device.type == 'cuda', device=device,
                                        verbose=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(folder), tuple(folds), checkpoint)
    except Exception as e:  # corrupt checkpoint, unknown trainer class, plans/weights mismatch
        raise CamError(f'could not load the model in {folder} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                       f'check that the checkpoints and plans.json belong together and nnunetv2 is the version '
                       f'that trained them') from e
    return predictor


def plain_network(predictor):
    """The predictor's network without torch.compile's wrapper (nnUNet_compile=1): plain state-dict keys and layer
    names, and no compilation of our hooked copies."""
    return getattr(predictor.network, '_orig_mod', predictor.network)


def fold_networks(predictor) -> list:
    """One inference copy of the network per fold: eval, no parameter gradients, no in-place activations (so the
    captured target-layer outputs stay intact), on the predictor's device. The predictor's own network is untouched."""
    nets = []
    for params in predictor.list_of_parameters:
        net = copy.deepcopy(plain_network(predictor))
        net.load_state_dict(params)
        net.eval().requires_grad_(False)
        for m in net.modules():
            if hasattr(m, 'inplace'):
                m.inplace = False
        nets.append(net.to(predictor.device))
    return nets
