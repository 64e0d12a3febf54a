"""The pipeline: preprocess (nnU-Net's preprocessor) -> sliding window with CAM -> export in the original geometry."""
import json
import os
import platform
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .errors import CamError, UsageError, one_line
from .evaluation import CaseEvaluation, EvaluationSettings, dilate, fold_spread, mask_statistics, plot_curves, \
    require_folds
from .outputs import CaseOutputs, check_writable
from .export import cam_format, maps_to_original, segmentation_to_original, write_map, \
    write_overview, write_probabilities, write_slices
from .failures import Failures
from .inputs import find_cases, list_folder, read_case, read_label, select_part
from .labels import output_classes
from .layers import LayerCache, resolve_layers
from .methods import get_method
from .cascade import PreviousStage
from .model import fold_networks, require_previous_stage
from .progress import Progress
from .sliding_window import CamSpec, combine_layers, sliding_window_cam
from .targets import resolve_targets
from .tile_plan import MANY_TILES, tile_count
from .uncertainty import RING_MM, UncertaintyMaps, mask_summary, max_entropy


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, (str, int)) else list(x)


@dataclass
class CaseResult:
    segmentation: np.ndarray             # original geometry, rw array order
    cams: Dict[str, np.ndarray]          # label name -> float32 in [0, 1], original geometry
    raw: Dict[str, np.ndarray]           # label name -> unnormalised map, original geometry
    info: dict = field(default_factory=dict)
    # with keep_preprocessed: the stitched logits and the maps (targets, *shape) in preprocessed space
    logits: Optional[torch.Tensor] = None
    maps: Optional[torch.Tensor] = None
    # with uncertainty: map name (entropy[_REGION], mutualinfo[_REGION], probstd_LABEL) -> float32, original geometry
    uncertainty: Dict[str, np.ndarray] = field(default_factory=dict)


class CamEngine:
    """An initialised nnU-Net predictor plus what to explain: layers, method, classes, pooling, region."""

    def __init__(self, predictor, target_layer=None, target_class=1, method: str = 'gradcam',
                 pooling: Optional[str] = None, target_region: str = 'predicted', pool_size: Optional[int] = None,
                 pool_mode: str = 'max', low_memory: bool = False, channel_attribution: bool = False,
                 networks: Optional[List[torch.nn.Module]] = None, uncertainty: bool = False):
        if pooling not in (None, 'volume', 'tile'):
            raise UsageError(f'--pooling must be volume or tile, not {pooling!r}')
        if target_region not in ('predicted', 'all'):
            raise UsageError(f'--target-region must be predicted or all, not {target_region!r}')
        self.predictor = predictor
        self.method = get_method(method, pool_size, pool_mode)
        self.targets = resolve_targets(predictor.label_manager, predictor.dataset_json, _as_list(target_class))
        self.networks = networks or fold_networks(predictor)  # the server passes the loaded ones
        self.layers = resolve_layers(self.networks[0], _as_list(target_layer))
        self.pooling, self.region = pooling or self.method.default_pooling, target_region
        self.low_memory = low_memory
        if channel_attribution and not self.method.uses_gradients:
            raise UsageError(f'--channel-attribution needs gradients, which {method} does not use; pick a gradient '
                             f'method such as gradcam or hirescam')
        self.channel_attribution = channel_attribution
        self.uncertainty = uncertainty  # entropy, mutual information and probability spread from the same pass

    def preprocess(self, files: Sequence[str], target_mask: Optional[str] = None,
                   prev_stage: Optional[str] = None, check: Callable[[], None] = lambda: None):
        """Read and check the case, then nnU-Net's own preprocessing (`check` between the two may stop it).
        Returns (data, properties, mask, image)."""
        p = self.predictor
        cm, pm = p.configuration_manager, p.plans_manager
        require_previous_stage(cm.previous_stage_name, prev_stage)
        if prev_stage is not None and target_mask is not None:
            raise UsageError('--target-mask cannot be combined with a cascade model (-prev_stage_predictions)')
        rw = pm.image_reader_writer_class()
        n_channels = len(p.dataset_json.get('channel_names', p.dataset_json.get('modality', {})))
        data, props = read_case(rw, files, n_channels, len(cm.patch_size) == 3)
        image = data[0].copy()
        seg = None
        if target_mask is not None:
            region = read_label(rw, target_mask, props, data.shape[1:], 'target mask') > 0
            if not region.any():
                raise UsageError(f'target mask {target_mask} is empty; draw the region as nonzero voxels')
        elif prev_stage is not None:
            # as nnU-Net's cascade: the previous stage goes through the preprocessor as the segmentation
            seg = read_label(rw, prev_stage, props, data.shape[1:], 'previous-stage segmentation')
        check()
        pre = cm.preprocessor_class(verbose=False)
        data, seg, props = pre.run_case_npy(data, seg, props, pm, cm, p.dataset_json)
        mask = None
        if prev_stage is not None:
            from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
            onehot = convert_labelmap_to_one_hot(seg[0], p.label_manager.foreground_labels, data.dtype)
            data = np.vstack((data, onehot))
        elif target_mask is not None:
            mask = torch.from_numpy(self._to_preprocessed(region, props, data.shape[1:]))
            if not mask.any():
                raise UsageError(f'target mask {target_mask} vanishes in the model\'s space: it lies outside the '
                                 f'image\'s nonzero region or is thinner than a voxel at the model\'s spacing; draw a '
                                 f'larger region on the image')
        return torch.from_numpy(data), props, mask, image

    def _to_preprocessed(self, region: np.ndarray, props: dict, shape) -> np.ndarray:
        """A mask (1, *image) into preprocessed space apart from the image, so that it cannot change the image's
        normalisation (use_mask_for_norm counts a segmentation's voxels): nnU-Net's transpose, crop box and
        segmentation resampling."""
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        m = region.astype(np.int8).transpose([0, *[i + 1 for i in pm.transpose_forward]])
        m = m[(slice(None), *[slice(lo, hi) for lo, hi in props['bbox_used_for_cropping']])]
        spacing = [props['spacing'][i] for i in pm.transpose_forward]
        target = cm.spacing if len(cm.spacing) == len(spacing) else [spacing[0], *cm.spacing]
        return cm.resampling_fn_seg(m, shape, spacing, target)[0] > 0

    def run(self, data: torch.Tensor, properties: dict, mask: Optional[torch.Tensor] = None,
            on_tile: Optional[Callable[[int, int], None]] = None, keep_preprocessed: bool = False,
            stitched_logits: Optional[torch.Tensor] = None,
            stitched_segmentation: Optional[np.ndarray] = None,
            layer_cache: Optional[LayerCache] = None) -> CaseResult:
        """Preprocessed data and its properties -> segmentation and CAMs in the original geometry, in memory.
        With `stitched_logits` (an earlier full run's of this case) and a mask (or one per target), only the tiles
        that overlap the mask run: a tile without target voxels adds nothing to a map, so the maps equal a full
        run's with that mask, and the segmentation is the earlier run's (`stitched_segmentation`, if kept, is not
        exported again). A `layer_cache` keeps the target layer's outputs, or stands in for forwards where it holds
        them (`LayerCache`)."""
        p = self.predictor
        t0 = time.perf_counter()
        only = None if stitched_logits is None or mask is None else mask if mask.ndim == data.ndim - 1 else mask.any(0)
        spec = CamSpec(self.method, self.layers, self.targets, self.pooling, self.region, mask, self.low_memory,
                       channel_attribution=self.channel_attribution, only_region=only, layer_cache=layer_cache,
                       uncertainty=self.uncertainty)
        out = sliding_window_cam(p, self.networks, data, spec, on_tile)
        if stitched_logits is not None:
            out.logits = stitched_logits
        t1 = time.perf_counter()
        seg = stitched_segmentation if stitched_logits is not None and stitched_segmentation is not None else \
            segmentation_to_original(out.logits, properties, p)
        raw = combine_layers(out.cams)
        raw_orig = maps_to_original(raw, properties, p)
        t2 = time.perf_counter()
        cams, raws, stats = {}, {}, {}
        for i, t in enumerate(self.targets):
            r = raw_orig[i]
            peak = float(r.max())
            c = (r / peak if peak > 0 else np.zeros_like(r)).astype(np.float32, copy=False)
            cams[t.name], raws[t.name] = c, r
            own = np.isin(seg, t.labels)  # a region: every label it covers
            total = float(c.sum())
            inside = float(c.sum(where=own)) / total if total > 0 else 0.0
            stats[t.name] = {'label': t.label, 'labels': list(t.labels), 'min': float(c.min()),
                             'max': float(c.max()), 'mean': total / c.size,
                             'raw_max': peak, 'energy_in_predicted_mask': inside,
                             'predicted_voxels': int(own.sum()),
                             'tile_mask_disagreement': out.tile_mask_disagreement[i]}
            if out.channel_attribution is not None:
                a = out.channel_attribution[i].double().abs()
                shares = (a / a.sum() if a.sum() > 0 else a).tolist()
                stats[t.name]['channel_attribution'] = dict(zip(input_channel_names(p), shares))
        uncertainty = {} if out.uncertainty is None else self._uncertainty(out.uncertainty, properties, seg, stats)
        t3 = time.perf_counter()
        info = {'tiles': out.n_tiles, 'classes': stats, 'low_memory': out.low_memory,
                'forwards_from_layer_cache': out.from_layer_cache,
                'out_of_memory_retry': out.out_of_memory_retry,
                'uncertainty_members': None if out.uncertainty is None else out.uncertainty.members,
                'timings_s': {'sliding_window': round(t1 - t0, 3), 'export': round(t2 - t1, 3),
                              'statistics': round(t3 - t2, 3)}}
        return CaseResult(seg, cams, raws, info, *((out.logits, raw) if keep_preprocessed else (None, None)),
                          uncertainty=uncertainty)

    def _uncertainty(self, u: UncertaintyMaps, properties: dict, seg: np.ndarray, stats: dict) -> Dict[str, np.ndarray]:
        """The maps in the original geometry, by name; each class's summary goes into its `stats`: mean entropy and
        MI in its predicted mask and in the 5 mm ring around it, and the share of the mask above half the entropy's
        maximum."""
        lm = self.predictor.label_manager
        per_region = [f'_{_safe(n)}' for n in output_classes(self.predictor.dataset_json)] if lm.has_regions else ['']
        names = [f'entropy{r}' for r in per_region] + [f'mutualinfo{r}' for r in per_region] + \
            [f'probstd_{_safe(t.name)}' for t in self.targets]
        maps = dict(zip(names, maps_to_original(torch.cat([u.entropy, u.mutual_info, u.prob_std]), properties,
                                                self.predictor)))
        h_max = max_entropy(lm.num_segmentation_heads, lm.has_regions)
        for t in self.targets:
            r = per_region[t.channel] if lm.has_regions else ''
            own = np.isin(seg, t.labels)
            ring = dilate(own, properties['spacing'], RING_MM) & ~own
            stats[t.name]['uncertainty'] = mask_summary(maps[f'entropy{r}'], maps[f'mutualinfo{r}'], own, ring, h_max)
        return maps


def input_channel_names(predictor) -> List[str]:
    """The image channels (dataset.json), then for a cascade stage the previous stage's one-hot channels, one per
    foreground label, as nnU-Net stacks them."""
    names = predictor.dataset_json.get('channel_names', predictor.dataset_json.get('modality', {}))
    images = [names[k] for k in sorted(names, key=int)]
    if not predictor.configuration_manager.previous_stage_name:
        return images
    label_names = {v: k for k, v in predictor.dataset_json['labels'].items() if isinstance(v, int)}
    return images + [f'previous stage: {label_names.get(v, v)}' for v in predictor.label_manager.foreground_labels]


def predict_with_cam(predictor, data: Union[np.ndarray, torch.Tensor], properties: dict, target_layer=None,
                     target_class=1, method: str = 'gradcam', **options):
    """Lower-level entry: an initialised nnUNetPredictor, a preprocessed (C, *shape) array and its properties
    (from nnU-Net's preprocessor) -> (segmentation, {label name: CAM in [0, 1]}), both in the original geometry."""
    engine = CamEngine(predictor, target_layer, target_class, method, **options)
    res = engine.run(torch.as_tensor(data), properties)
    return res.segmentation, res.cams


def _versions() -> dict:
    out = {'python': platform.python_version()}
    for pkg in ('nnunetv2', 'torch', 'numpy', 'SimpleITK', 'nnunetv2-cam-core', 'grad-cam'):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _safe(name: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name)


@dataclass
class PreparedCase:
    """A case already read and preprocessed for the engine's model (the server's cache): no reading or
    preprocessing; `logits`, an earlier full run's, let a masked run compute only the mask's tiles."""
    data: torch.Tensor
    properties: dict
    image: np.ndarray
    mask: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    segmentation: Optional[np.ndarray] = None  # the logits' exported segmentation
    layer_cache: Optional[LayerCache] = None


@dataclass
class CaseOptions:
    """What a run writes and checks for every case."""
    target_mask: Optional[str] = None
    save_raw: bool = False
    save_numpy: bool = False
    save_slices: bool = False
    overwrite: bool = False
    evaluation: Optional[EvaluationSettings] = None  # --evaluate
    reference_mask: Optional[str] = None
    fold_spread: bool = False
    prepared: Optional[PreparedCase] = None
    save_probabilities: bool = False  # CASE.npz and CASE.pkl, as nnUNetv2_predict --save_probabilities


def run_cases(engine: CamEngine, inputs: Sequence[str], output_folder: Union[str, Path], *,
              target_mask: Optional[str] = None, prev_stage_folder: Optional[str] = None,
              previous_stage_model: Optional[Union[str, Path]] = None, folds: Optional[Sequence] = None,
              checkpoint: str = 'checkpoint_final.pth', save_raw: bool = False,
              save_numpy: bool = False, save_slices: bool = False, overwrite: bool = False,
              evaluation: Optional[EvaluationSettings] = None, reference_mask: Optional[str] = None,
              save_fold_spread: bool = False, prepared: Optional[PreparedCase] = None,
              progress: Optional[Progress] = None, run_info: Optional[dict] = None, num_parts: int = 1,
              part_id: int = 0, stop_on_error: bool = True, keep_results: bool = True,
              save_probabilities: bool = False) -> Dict[str, CaseResult]:
    """Every case in `inputs` -> files in `output_folder`, one case at a time, each written atomically. A cascade
    stage takes its previous stage's segmentations from `prev_stage_folder`, or runs `previous_stage_model` (with
    the cascade's `folds` where it has them) first, as nnU-Net would, keeping nothing of it. `evaluation` adds the
    trust figures (deletion/insertion, sanity check, mask statistics, against `reference_mask` too) to the sidecar.
    `prepared`: the one case of `inputs`, already preprocessed; its result keeps the stitched logits.
    `num_parts`/`part_id`: only this part's share of the cases (nnU-Net's split). Without `stop_on_error` a case
    of several that fails is reported (a `failed` event, OUTPUT/failures.json) and the others run; the call then
    raises one CamError naming the failed cases. `keep_results=False` returns nothing and keeps no case in memory (batches).
    `save_probabilities`: also CASE.npz and CASE.pkl, written by nnU-Net's export as nnUNetv2_predict writes them."""
    p = engine.predictor
    progress = progress or Progress('none')
    opts = CaseOptions(target_mask, save_raw, save_numpy, save_slices, overwrite, evaluation, reference_mask,
                       save_fold_spread, prepared, save_probabilities)
    if evaluation is not None:
        evaluation.check()
    elif reference_mask is not None:
        raise UsageError('--reference-mask is compared with the map by --evaluate; add --evaluate')
    if save_fold_spread:
        require_folds(engine)
    out_dir = Path(output_folder)
    check_writable(out_dir)
    ending = p.dataset_json['file_ending']
    rw = p.plans_manager.image_reader_writer_class()
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    cases = find_cases(inputs, rw.supported_file_endings, p.dataset_json.get('channel_names',
                                                                               p.dataset_json.get('modality', {})),
                       rgb_files=isinstance(rw, NaturalImage2DIO), file_ending=ending)
    left_out = [f for i in inputs if Path(i).is_dir() for f in list_folder(Path(i), rw.supported_file_endings,
                                                                             ending)[1]]
    if left_out:
        progress.emit('warning', message=f'{len(left_out)} image(s) in the input folder do not end in the model\'s '
                                         f'{ending} (e.g. {left_out[0].name}) and are left out, as nnU-Net leaves '
                                         f'them out; pass them as files to include them')
    for option, value in (('--target-mask', target_mask), ('--reference-mask', reference_mask)):
        if value is not None and len(cases) > 1:
            raise UsageError(f'{option} applies to one case; pass a single case with it')
    batch = len(cases) > 1  # one case is not a batch: its own error, as it always was
    cases = select_part(cases, num_parts, part_id)
    results, failed = {}, []
    failures = Failures(out_dir)
    previous = None
    if p.configuration_manager.previous_stage_name and prev_stage_folder is None and previous_stage_model:
        previous = PreviousStage(Path(previous_stage_model), folds, checkpoint, p)
    with tempfile.TemporaryDirectory(prefix='.nnunetcam-previous-stage-', dir=out_dir) as previous_out:
        for case, files in cases.items():
            try:
                res = _run_case(engine, case, files, out_dir, rw, ending, opts, prev_stage_folder, previous,
                                Path(previous_out), progress, run_info)
            except Exception as e:
                if stop_on_error or not batch:
                    raise
                message = str(e) if isinstance(e, CamError) else one_line(e)
                progress.emit('failed', message=f'{case}: {message}')
                failures.add(case, files, message, f'{part_id}/{num_parts}')
                failed.append(case)
                continue
            if res is not None:
                failures.clear(case)
                if keep_results:
                    results[case] = res
    if failed:
        raise CamError(f'{len(failed)} of {len(cases)} cases failed ({", ".join(failed[:3])}'
                       f'{", ..." if len(failed) > 3 else ""}); the others were written; see '
                       f'{out_dir / "failures.json"}, fix those cases and run again (finished cases are skipped)')
    return results


def _evaluate(engine, case, data, props, mask, res, reference, opts, progress) -> Dict[str, dict]:
    """The evaluation key of each class: the curves and sanity check, and the map against the masks."""
    settings = opts.evaluation
    progress.stage('evaluate', case)
    evaluation = CaseEvaluation(engine, data, res.logits, res.maps, settings, mask, progress.steps).run()
    for t in engine.targets:
        e = evaluation[t.name]
        if 'skipped' in e:
            progress.emit('warning', message=f'{case}: {e["skipped"]}; evaluation of {t.name} skipped')
        stats = {'predicted': mask_statistics(res.cams[t.name], np.isin(res.segmentation, t.labels),
                                              props['spacing'], settings.margin_mm)}
        if reference is not None:
            stats['reference'] = mask_statistics(res.cams[t.name], np.isin(reference, t.labels), props['spacing'],
                                                 settings.margin_mm)
        e['mask_statistics'] = stats
        if 'sanity' in e and e['sanity']['passes'] is not True:
            progress.emit('warning', message=f'{case}: {t.name}: the map {e["sanity"]["verdict"]}')
        if e.get('cannot_rank'):
            progress.emit('warning', message=f'{case}: {t.name}: {e["cannot_rank"]}')
    return evaluation


def _run_case(engine, case, files, out_dir, rw, ending, opts: CaseOptions, prev_stage_folder, previous,
              previous_out, progress, run_info):
    p = engine.predictor
    method = engine.method.name
    progress.case = case
    if (out_dir / f'{case}_cam.json').is_file() and not opts.overwrite:
        progress.emit('skip', message=f'{case}: outputs exist in {out_dir}, skipped (use --overwrite to redo)')
        return None
    t0 = time.perf_counter()
    prev = None
    if previous is not None:
        prev = previous.segment(case, files, previous_out, progress)
    elif prev_stage_folder is not None:
        prev = os.path.join(prev_stage_folder, case + ending)
        if not os.path.isfile(prev):
            raise UsageError(f'no previous-stage segmentation {prev}; run the previous stage on {case} first')
    t_previous = time.perf_counter()
    progress.stage('preprocess', case)
    pc = opts.prepared
    data, props, mask, image = (pc.data, pc.properties, pc.mask, pc.image) if pc else \
        engine.preprocess(files, opts.target_mask, prev)
    fmt = cam_format(rw, props)  # a model whose maps cannot be written fails here, before the work
    reference = None if opts.reference_mask is None else \
        read_label(rw, opts.reference_mask, props, image.shape, 'reference mask')[0]
    t1 = time.perf_counter()
    tiles = tile_count(data.shape[1:], p.configuration_manager.patch_size, p.tile_step_size)
    if tiles > MANY_TILES:
        progress.emit('warning', message=f'{case}: {tiles} tiles at -step_size {p.tile_step_size:g}, which takes '
                                         f'long; nnU-Net uses 0.5')
    progress.stage('tiles', case)
    res = engine.run(data, props, mask, on_tile=progress.tiles,
                     keep_preprocessed=opts.evaluation is not None or pc is not None or opts.save_probabilities,
                     stitched_logits=pc.logits if pc else None, stitched_segmentation=pc.segmentation if pc else None,
                     layer_cache=pc.layer_cache if pc else None)
    logits = res.logits  # the evaluation lets go of them
    timings = {'previous_stage': round(t_previous - t0, 3), 'preprocess': round(t1 - t_previous, 3),
               **res.info['timings_s']}
    if res.info['uncertainty_members'] == 1:
        progress.emit('warning', message=f'{case}: mutual information and probability spread are 0: the ensemble has '
                                         f'one member (one fold, no TTA mirrors), so nothing disagrees; entropy is '
                                         f'written; use more folds or TTA for them')
    evaluation = spread = None
    if opts.evaluation is not None:
        t2 = time.perf_counter()
        evaluation = _evaluate(engine, case, data, props, mask, res, reference, opts, progress)
        res.logits = res.maps = None
        timings['evaluate'] = round(time.perf_counter() - t2, 3)
    if opts.fold_spread:
        t2 = time.perf_counter()
        progress.stage('fold_spread', case)
        spread = fold_spread(engine, data, props)
        timings['fold_spread'] = round(time.perf_counter() - t2, 3)
    progress.stage('export', case)
    if res.info['out_of_memory_retry']:
        progress.emit('warning', message=f'{case}: the device ran out of memory; finished in low-memory mode '
                                         f'(result arrays on the CPU, one forward graph at a time)')
    for name, st in res.info['classes'].items():
        if st['raw_max'] == 0:
            progress.emit('warning', message=f'{case}: target {name!r} is absent (no voxels predicted as it, or '
                                             f'no activation); wrote a zero map')
        if evaluation is not None:
            st['evaluation'] = evaluation[name]
    t_write = time.perf_counter()
    with CaseOutputs(out_dir) as co, ThreadPoolExecutor(2) as pool:  # images compress two at a time
        # with probabilities, nnU-Net's own export writes them and the segmentation, as nnUNetv2_predict does
        writes = [pool.submit(write_probabilities, logits, props, p, co, case) if opts.save_probabilities else
                  pool.submit(rw.write_seg, res.segmentation, co.path(case + ending), props)]
        uncertainty = {name: pool.submit(write_map, arr, co, f'{case}_{name}', ending, props, fmt, normalised=False)
                       for name, arr in res.uncertainty.items()}
        maps, spreads = {}, {}
        for i, name in enumerate(res.cams):
            stem = f'{case}_cam_{_safe(name)}_{_safe(method)}'
            maps[name] = pool.submit(write_map, res.cams[name], co, stem, ending, props, fmt)
            if opts.save_raw:
                writes.append(pool.submit(write_map, res.raw[name], co, f'{case}_camraw_{_safe(name)}_{_safe(method)}',
                                          ending, props, fmt, normalised=False))
            if spread is not None:
                spreads[name] = pool.submit(write_map, spread[i], co, f'{case}_camspread_{_safe(name)}_{_safe(method)}',
                                            ending, props, fmt, normalised=False)
            if opts.save_numpy and fmt != 'png':  # PNG models get the .npy anyway
                np.save(co.path(stem + '.npy'), res.cams[name])
            if opts.save_slices:
                save_slices_dir = co.path(stem + '_slices')
                write_slices(image, res.cams[name], save_slices_dir, case)
        if opts.save_slices:
            write_overview(image, res.segmentation, res.cams, co.path(f'{case}_overview.png'))
        curves = evaluation is not None and plot_curves(evaluation, co.path(f'{case}_evaluation.png'), case)
        files_by_class = {name: f.result() for name, f in maps.items()}
        spread_files = {name: f.result() for name, f in spreads.items()}
        uncertainty_files = {name: f.result() for name, f in uncertainty.items()}
        for w in writes:
            w.result()
        timings['write'] = round(time.perf_counter() - t_write, 3)
        timings['total'] = round(time.perf_counter() - t0, 3)
        sidecar = {**(run_info or {}), 'case': case, 'inputs': list(files), 'method': method,
                   'layers': engine.layers, 'pooling': engine.pooling if engine.method.pooled else None,
                   'pool_size': getattr(engine.method, 'pool_size', None),
                   'pool_mode': getattr(engine.method, 'pool_mode', None),
                   'channel_attribution': engine.channel_attribution,
                   'prev_stage_predictions': prev_stage_folder,
                   'target_region': 'mask' if mask is not None else engine.region, 'target_mask': opts.target_mask,
                   'tta': bool(p.use_mirroring and p.allowed_mirroring_axes), 'step_size': p.tile_step_size,
                   'low_memory': res.info['low_memory'], 'cam_format': fmt,
                   'input_channels': input_channel_names(p),
                   'previous_stage': None if previous is None else {'model': str(previous.folder),
                                                                    'folds': previous.folds},
                   'device': str(p.device), 'tiles': res.info['tiles'], 'timings_s': timings,
                   **({'forwards_from_layer_cache': res.info['forwards_from_layer_cache']} if pc and pc.layer_cache
                      else {}),
                   'segmentation': case + ending, 'cams': files_by_class, 'classes': res.info['classes'],
                   'evaluation_settings': None if evaluation is None else {
                       **asdict(opts.evaluation), 'reference_mask': opts.reference_mask,
                       'curves': f'{case}_evaluation.png' if curves else None},
                   'fold_spread': spread_files or None,
                   'probabilities': f'{case}.npz' if opts.save_probabilities else None,
                   'uncertainty': {'members': res.info['uncertainty_members'], 'ring_mm': RING_MM,
                                   'files': uncertainty_files} if uncertainty_files else None,
                   'versions': _versions()}
        with open(co.path(f'{case}_cam.json'), 'w') as f:
            json.dump(sidecar, f, indent=2)
        written = co.commit()
    progress.emit('result', files=sorted(written.values()),
                  message=f'{case}: wrote {len(written)} outputs to {out_dir}')
    return res


def run_cam_for_prediction(predictor, input_files, output_folder, target_layer=None, target_class=1,
                           method: str = 'gradcam', cam_type: Optional[str] = None, verbose: bool = False,
                           save_slices: bool = True, save_numpy: bool = False, pool_size: Optional[int] = None,
                           pool_mode: str = 'max', pooling: Optional[str] = None, overwrite: bool = True) -> List[np.ndarray]:
    """Compatible with nnunetv2-cam's API: returns one CAM per case (first target class) in [0, 1], now in the
    ORIGINAL image geometry, and writes the segmentation, CAM files, sidecar and (by default) PNG slices.
    `cam_type` is accepted and ignored: 2D and 3D follow the model's configuration."""
    engine = CamEngine(predictor, target_layer, target_class, method, pooling=pooling, pool_size=pool_size,
                       pool_mode=pool_mode)
    inputs = [input_files] if isinstance(input_files, (str, Path)) else list(input_files)
    results = run_cases(engine, [str(i) for i in inputs], output_folder, save_slices=save_slices,
                        save_numpy=save_numpy, overwrite=overwrite, progress=Progress('bar' if verbose else 'none'))
    first = engine.targets[0].name
    return [r.cams[first] for r in results.values()]
