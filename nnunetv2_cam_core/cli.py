"""`nnunetv2_cam` / `python -m nnunetv2_cam_core`: segmentation + CAMs for any trained nnU-Net v2 model."""
import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from .errors import CamError, UsageError, one_line
from .progress import Progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='nnunetv2_cam',
        description='Segmentation and Class Activation Maps for a trained nnU-Net v2 model, written in the '
                    'original image geometry. `nnunetv2_cam check-env` reports packages and devices; '
                    '`nnunetv2_cam evaluate -o FOLDER [--eval-... options]` adds the trust figures to an earlier run; '
                    '`nnunetv2_cam report OUT_A [OUT_B] -o REPORT` tabulates one cohort\'s explanations or compares '
                    'two.')
    io = p.add_argument_group('input and output')
    io.add_argument('-i', '--input', nargs='+', help='image file(s) or folder in nnU-Net naming (CASE_0000.nii.gz)')
    io.add_argument('-o', '--output', help='output folder')
    io.add_argument('--target-mask', help='label file in the input image\'s geometry: explain the class over '
                                          'these voxels (one case)')
    io.add_argument('-prev_stage_predictions', help='folder with previous-stage segmentations (cascade models; '
                                                    'default: run the previous stage\'s model folder next to it)')
    io.add_argument('--overwrite', action='store_true', help='redo cases whose outputs exist (default: skip them)')
    io.add_argument('-num_parts', type=int, default=1, help='split the cases into this many parts, as nnU-Net does '
                    '(one per GPU or cluster task; default: 1)')
    io.add_argument('-part_id', type=int, default=0, help='which part this run takes, 0 .. num_parts-1')
    io.add_argument('--stop-on-error', action='store_true',
                    help='stop at the first case that fails (default: report it in OUTPUT/failures.json, go on, and '
                         'exit non-zero at the end)')
    io.add_argument('--save-raw', action='store_true', help='also write the unnormalised CAM')
    io.add_argument('--save-numpy', action='store_true', help='also write the CAM as .npy')
    io.add_argument('--save-slices', action='store_true', help='also write PNG overlays, one per slice, and an overview')
    io.add_argument('--no-save-slices', action='store_true', help='no PNGs (the default; kept for compatibility)')
    io.add_argument('--save_probabilities', '--save-probabilities', dest='save_probabilities', action='store_true',
                    help='also write CASE.npz (probabilities) and CASE.pkl (properties), as nnUNetv2_predict does')
    io.add_argument('--save-uncertainty', action='store_true',
                    help='also write CASE_entropy, CASE_mutualinfo (per region for region models) and '
                         'CASE_probstd_<class>, from the folds x mirrors of the same pass')
    m = p.add_argument_group('model')
    m.add_argument('-m', '--model', help='trained model folder (holds dataset.json, plans.json, fold_N/)')
    m.add_argument('-d', help='dataset name or id, resolved under $nnUNet_results (instead of -m)')
    m.add_argument('-c', help='configuration, e.g. 3d_fullres (with -d)')
    m.add_argument('-tr', default='nnUNetTrainer', help='trainer (with -d; default: %(default)s)')
    m.add_argument('-p', default='nnUNetPlans', help='plans identifier (with -d; default: %(default)s)')
    m.add_argument('-f', '--folds', nargs='+', help='folds to ensemble, or "all" (default: every trained fold)')
    m.add_argument('-chk', '--checkpoint', default='checkpoint_final.pth', help='default: %(default)s')
    m.add_argument('-device', default='auto', help='auto, cuda, cpu or mps (default: auto = cuda if available)')
    m.add_argument('-step_size', type=float, default=0.5, help='sliding window step, fraction of the patch '
                                                               '(default: %(default)s)')
    m.add_argument('--disable-tta', '--disable_tta', dest='disable_tta', action='store_true',
                   help='no mirroring test-time augmentation')
    m.add_argument('--low-memory', action='store_true',
                   help='keep one forward graph at a time instead of all folds x mirrors of a tile (one extra '
                        'forward per tile; used automatically after a CUDA out-of-memory error)')
    c = p.add_argument_group('CAM')
    c.add_argument('--target-layer', nargs='+', action='extend', help='module name(s) from --list-layers, or the '
                   'shortcuts bottleneck / last_decoder; several are each normalised and averaged (default: '
                   'last_decoder, the last decoder stage)')
    c.add_argument('--target-class', nargs='+', default=['1'], help='class index(es) or dataset.json label name(s); '
                   'several share one forward pass (default: 1)')
    c.add_argument('--method', default='gradcam', help='CAM method (see --list-methods; default: %(default)s)')
    c.add_argument('--pooling', choices=('volume', 'tile'),
                   help='pooled methods: channel weights per tile, or one set from all tiles (volume); default: '
                        'tile for gradcam/gradcam++/xgradcam, volume for eigencam/eigengradcam')
    c.add_argument('--target-region', choices=('predicted', 'all'), default='predicted',
                   help='sum the class logit over the voxels predicted as the class (default) or all voxels')
    c.add_argument('--channel-attribution', action='store_true',
                   help='also write, per class, the share of |gradient x input| at the network input that comes '
                        'from each input channel, into the sidecar (gradient methods; a full backward per tile)')
    c.add_argument('--pool-size', type=int, help='segxrescam only: gradient pooling window')
    c.add_argument('--pool-mode', default='max', choices=('max', 'mean'), help='segxrescam only (default: max)')
    c.add_argument('--cam-type', choices=('2d', '3d'), help='accepted for compatibility; the configuration decides')
    e = p.add_argument_group('trust figures (into the sidecar\'s evaluation key per class, curves in CASE_evaluation.png)')
    e.add_argument('--evaluate', action='store_true',
                   help='deletion/insertion curves against random rankings (re-predicting only the tiles that overlap '
                        'the class\'s region), the model- and data-randomisation sanity check, and where the map lies '
                        'against the mask')
    e.add_argument('--eval-steps', type=int, default=10, help='deletion/insertion steps (default: %(default)s)')
    e.add_argument('--eval-baseline', choices=('blur', 'mean'), default='blur',
                   help='what removed voxels become: the image blurred (5 mm gaussian) or its mean (default: blur)')
    e.add_argument('--eval-margin-mm', type=float, default=5.0,
                   help='the region evaluated: the predicted mask (or --target-mask) dilated by this (default: 5)')
    e.add_argument('--eval-seeds', type=int, default=3, help='random rankings to compare with (default: 3)')
    e.add_argument('--eval-max-tiles', type=int, default=100,
                   help='skip the evaluation of a class whose region needs more tiles (default: %(default)s)')
    e.add_argument('--eval-no-sanity', action='store_true', help='no model- and data-randomisation sanity check')
    e.add_argument('--reference-mask', help='ground-truth label file in the input\'s geometry: the map against it too '
                                            '(with --evaluate; one case)')
    e.add_argument('--save-fold-spread', action='store_true',
                   help='also write, per class, the voxel-wise standard deviation of the folds\' normalised maps '
                        '(two or more folds)')
    s = p.add_argument_group('explanation server (nnunetv2_cam serve)')
    s.add_argument('--server', help='run on this server (URL); -m is then one of its model ids')
    s.add_argument('--token-file', help='file holding the server\'s token (with --server)')
    s.add_argument('--server-forget', action='store_true',
                   help='delete the cases from the server after the run (default: they stay, under the server\'s '
                        'bounds, so a later run on the same files uploads and preprocesses nothing)')
    o = p.add_argument_group('information')
    o.add_argument('--list-methods', action='store_true', help='list CAM methods and exit')
    o.add_argument('--list-layers', action='store_true', help='list the model\'s layers (with -m) and exit')
    o.add_argument('--progress', choices=('bar', 'json', 'none'), default='bar',
                   help='bar: tqdm on stderr; json: one JSON object per line on stdout')
    o.add_argument('--verbose', action='store_true', help='tracebacks on errors')
    return p


def check_env() -> dict:
    try:
        import torch
        from .api import _versions
    except ImportError as e:
        return {'ok': False, 'python': sys.executable,
                'message': f'{e.name or e} is not installed in {sys.executable}; install the requirements there '
                           f'(pip install nnunetv2 grad-cam) or pick another Python'}
    info = {'ok': True, 'python': sys.executable, 'versions': _versions(), 'cuda_available': torch.cuda.is_available(),
            'devices': ['cpu']}
    if torch.cuda.is_available():
        info['devices'] += [f'cuda:{i} {torch.cuda.get_device_name(i)}' for i in range(torch.cuda.device_count())]
        try:
            (torch.ones(2, device='cuda') * 2).sum().item()
            info['cuda_works'] = True
        except RuntimeError as e:
            info['cuda_works'] = False
            info['cuda_error'] = str(e).splitlines()[0]
    return info


def _list_methods(as_json: bool) -> None:
    from .methods import available_methods
    rows = available_methods()
    if as_json:
        print(json.dumps(rows))
    else:
        for name, desc in rows.items():
            print(f'{name:20s} {desc}')


def _load(args):
    from .cascade import previous_stage_folder
    from .model import (configuration_of, load_predictor, previous_stage_of, resolve_device, resolve_folds,
                        resolve_model_folder)
    folder = resolve_model_folder(args.model, args.d, args.c, args.tr, args.p)
    folds = resolve_folds(folder, args.folds, args.checkpoint)
    configuration = configuration_of(folder, folds[0], args.checkpoint)
    previous = previous_stage_of(folder, configuration)
    args.previous_stage_model = None
    if previous and not args.list_layers and not args.prev_stage_predictions:
        args.previous_stage_model = previous_stage_folder(folder, previous)  # before loading: fail early
    device = resolve_device(args.device)
    predictor = load_predictor(folder, folds, args.checkpoint, device, args.step_size, not args.disable_tta)
    return folder, folds, configuration, predictor


def _list_layers(args, as_json: bool, out) -> None:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from .layers import list_layers
    from .model import plain_network
    *_, pred = _load(args)
    n_in = determine_num_input_channels(pred.plans_manager, pred.configuration_manager, pred.dataset_json)
    rows = list_layers(plain_network(pred).to(pred.device).eval(), pred.configuration_manager.patch_size, n_in, pred.device)
    if as_json:
        print(json.dumps(rows), file=out)
        return
    from .api import input_channel_names
    names = input_channel_names(pred)
    images = [n for n in names if not n.startswith('previous stage: ')]
    print(f'input channels: {", ".join(images)} (images)' + (
        f'; {", ".join(names[len(images):])} (one-hot, not images)' if len(names) > len(images) else ''), file=out)
    print(f'{"layer":45s} {"type":22s} {"output (C, *spatial)":24s} {"stride":14s}', file=out)
    for r in rows:
        print(f'{r["name"]:45s} {r["type"]:22s} {str(r["shape"]):24s} {str(r["stride"]):14s} {r["mark"]}', file=out)


LOCAL_ONLY = {k: f'--{k.replace("_", "-")}' for k in (
    'evaluate', 'save_fold_spread', 'reference_mask', 'save_raw', 'save_numpy', 'save_slices', 'channel_attribution',
    'low_memory', 'pool_size', 'save_probabilities', 'save_uncertainty')} | {'prev_stage_predictions': '-prev_stage_predictions'}


def run_on_server(args, progress: Progress) -> int:
    from .client import ServerClient, run_on_server as run_cases_on_server
    if not args.token_file or not os.path.isfile(args.token_file):
        raise UsageError('--server needs --token-file FILE holding the server\'s token (printed by nnunetv2_cam serve)')
    if not args.model:
        raise UsageError('-m MODEL_ID is required with --server (GET /v1/models on the server lists them)')
    unsupported = [flag for k, flag in LOCAL_ONLY.items() if getattr(args, k)]
    if unsupported:
        raise UsageError(f'{", ".join(unsupported)} run locally only; drop {"them" if len(unsupported) > 1 else "it"} '
                         f'or run without --server')
    client = ServerClient(args.server, Path(args.token_file).read_text().strip())
    request = {'folds': args.folds, 'checkpoint': args.checkpoint, 'tta': not args.disable_tta,
               'step_size': args.step_size, 'classes': args.target_class, 'layers': args.target_layer,
               'method': args.method, 'pooling': args.pooling, 'region': {'kind': args.target_region}}
    run_cases_on_server(client, args.model, args.input, Path(args.output), request, progress, args.overwrite,
                        args.target_mask, args.server_forget)
    progress.stage('done')
    return 0


def run(args, progress: Progress) -> int:
    if not args.input or not args.output:
        raise UsageError('-i INPUT and -o OUTPUT are required (or use --list-methods / --list-layers)')
    from .inputs import select_part
    select_part({}, args.num_parts, args.part_id)  # a wrong part fails before the model loads
    if args.server:
        if args.num_parts != 1:
            raise UsageError('-num_parts splits local runs; with --server, send each part\'s cases as their own run')
        return run_on_server(args, progress)  # imports no torch
    from .api import CamEngine, run_cases
    evaluation = None
    if args.evaluate:
        from .evaluation import EvaluationSettings
        evaluation = EvaluationSettings(args.eval_steps, args.eval_baseline, args.eval_margin_mm, args.eval_seeds,
                                        args.eval_max_tiles, not args.eval_no_sanity)
        evaluation.check()  # before loading the model
    progress.stage('load')
    folder, folds, configuration, predictor = _load(args)
    engine = CamEngine(predictor, args.target_layer, args.target_class, args.method, args.pooling,
                       args.target_region, args.pool_size, args.pool_mode, args.low_memory,
                       args.channel_attribution, uncertainty=args.save_uncertainty)
    run_info = {'model': str(folder), 'configuration': configuration, 'trainer': predictor.trainer_name, 'folds': list(folds), 'checkpoint': args.checkpoint}
    if args.previous_stage_model:
        run_info['previous_stage_model'] = str(args.previous_stage_model)
    run_cases(engine, args.input, args.output, target_mask=args.target_mask,
              evaluation=evaluation, reference_mask=args.reference_mask, save_fold_spread=args.save_fold_spread,
              prev_stage_folder=args.prev_stage_predictions, previous_stage_model=args.previous_stage_model,
              folds=folds, checkpoint=args.checkpoint, save_raw=args.save_raw, save_numpy=args.save_numpy,
              save_slices=args.save_slices and not args.no_save_slices, overwrite=args.overwrite, progress=progress,
              run_info=run_info, num_parts=args.num_parts, part_id=args.part_id, stop_on_error=args.stop_on_error,
              keep_results=False, save_probabilities=args.save_probabilities)
    progress.stage('done')
    return 0


# what an earlier run's sidecar must name to make its maps again: every option that changes a map
REPLAYED = ('inputs', 'model', 'folds', 'checkpoint', 'method', 'layers', 'classes', 'step_size', 'tta', 'pooling',
            'pool_size', 'pool_mode', 'target_region', 'target_mask', 'prev_stage_predictions', 'channel_attribution')


def earlier_run_arguments(sidecar: dict, folder: str) -> List[str]:
    """The arguments that give an earlier run's maps (and channel attribution) again, from its CASE_cam.json."""
    args = ['-i', *sidecar['inputs'], '-o', folder, '-m', sidecar['model'], '-f', *map(str, sidecar['folds']),
            '-chk', sidecar['checkpoint'], '--method', sidecar['method'], '--target-layer', *sidecar['layers'],
            '--target-class', *sidecar['classes'], '-step_size', str(sidecar['step_size'])]
    # pool size and mode: SegXResCAM's alone, None for other methods
    for key, flag in (('pooling', '--pooling'), ('pool_size', '--pool-size'), ('pool_mode', '--pool-mode'),
                      ('prev_stage_predictions', '-prev_stage_predictions')):
        if sidecar[key] is not None:
            args += [flag, str(sidecar[key])]
    if not sidecar['tta']:
        args.append('--disable_tta')
    if sidecar['channel_attribution']:
        args.append('--channel-attribution')
    if sidecar['target_mask']:
        args += ['--target-mask', sidecar['target_mask']]
    elif sidecar['target_region'] == 'all':
        args += ['--target-region', 'all']
    return args


def evaluate_earlier_run(argv: List[str]) -> int:
    """`nnunetv2_cam evaluate -o FOLDER [--eval-... options]`: each case of an earlier run again, with every
    map-changing option its sidecar records (model, folds, checkpoint, classes, layers, method, pooling, SegXResCAM's
    pool size and mode, region, step, TTA, previous-stage folder, channel attribution), plus --evaluate, over its
    outputs. A sidecar that lacks one is refused before any case runs."""
    parser = argparse.ArgumentParser(prog='nnunetv2_cam evaluate', description=evaluate_earlier_run.__doc__)
    parser.add_argument('-o', '--output', required=True, help='the earlier run\'s output folder')
    known, rest = parser.parse_known_args(argv)
    paths = sorted(Path(known.output).glob('*_cam.json'))
    if not paths:
        print(f'error: no CASE_cam.json in {known.output}; give the output folder of an earlier nnunetv2_cam run',
              file=sys.stderr)
        return 2
    sidecars = [json.loads(p.read_text()) for p in paths]
    for path, sc in zip(paths, sidecars):
        missing = [k for k in REPLAYED if k not in sc]
        if missing:
            print(f'error: {path} does not record {", ".join(missing)}, which can change the map, so its maps cannot '
                  f'be made again exactly; run those cases again with their options and --evaluate', file=sys.stderr)
            return 2
    for sc in sidecars:
        rc = main(earlier_run_arguments(sc, known.output) + ['--evaluate', '--overwrite', *rest])
        if rc:
            return rc
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['evaluate']:
        return evaluate_earlier_run(argv[1:])
    if argv[:1] == ['report']:
        from .report import main as report
        return report(argv[1:])
    if argv[:1] == ['serve']:
        from .server import main as serve
        return serve(argv[1:])
    if argv[:1] == ['check-env']:
        info = check_env()
        print(json.dumps(info, indent=2))
        return 0 if info['ok'] else 1
    args = build_parser().parse_args(argv)
    as_json = args.progress == 'json'
    progress = Progress(args.progress, stream=sys.stdout)
    try:
        if args.list_methods:
            _list_methods(as_json)
            return 0
        # in json mode stdout carries only our JSON lines; nnU-Net's prints go to stderr
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            if args.list_layers:
                _list_layers(args, as_json, progress.stream)
                return 0
            return run(args, progress)
    except CamError as e:
        progress.close()
        if as_json:
            progress.emit('error', message=str(e), exit_code=e.exit_code)
        print(f'error: {e}', file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        progress.close()
        print('error: cancelled; no partial outputs were kept', file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line
        progress.close()
        msg = one_line(e)
        if as_json:
            progress.emit('error', message=msg, exit_code=1)
        print(f'error: {msg} (rerun with --verbose for the traceback)', file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1
    finally:
        progress.close()
