"""How far to trust a map, per case and class.

- Deletion and insertion through nnU-Net's own sliding window: the class's region (its predicted mask dilated by a
  margin, or the target mask) is re-predicted from the tiles that overlap it alone, as the voxels the map ranks
  highest are replaced by a baseline (deletion) or restored onto it (insertion); random rankings of the same voxels
  are the yardstick.
- Sanity checks (Adebayo et al. 2018): the map after re-initialising the network from the segmentation head towards
  the encoder, and on an intensity-shuffled input, compared with the trained map by rank correlation.
- Where the map lies against the predicted mask (or a reference mask), in the original geometry.
"""
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import spearmanr

from .errors import UsageError
from .sliding_window import CamSpec, RegionPrediction, combine_layers, sliding_window_cam
from .targets import Target, predicted_mask

SANITY_LIMIT = 0.5  # rank correlation above this once the decoder is random: the map does not depend on the model
BLUR_SIGMA_MM = 5.0


@dataclass
class EvaluationSettings:
    steps: int = 10             # deletion/insertion fractions 0, 1/steps, ..., 1
    baseline: str = 'blur'      # 'blur' (the image blurred with a 5 mm gaussian) or 'mean' (each channel's mean)
    margin_mm: float = 5.0      # the region: the predicted mask dilated by this
    seeds: int = 3              # random rankings
    max_tiles: int = 100        # a region that needs more tiles is not evaluated
    sanity: bool = True

    def check(self) -> None:
        if self.steps < 1:
            raise UsageError(f'--eval-steps must be 1 or more, not {self.steps}; 10 gives curves at every 10 %')
        if self.baseline not in ('blur', 'mean'):
            raise UsageError(f'--eval-baseline must be blur or mean, not {self.baseline!r}')
        if not self.margin_mm >= 0:
            raise UsageError(f'--eval-margin-mm must be 0 or more, not {self.margin_mm}')
        if self.seeds < 1:
            raise UsageError(f'--eval-seeds must be 1 or more, not {self.seeds}')
        if self.max_tiles < 1:
            raise UsageError(f'--eval-max-tiles must be 1 or more, not {self.max_tiles}')


def _sampling(spacing: Sequence[float], ndim: int) -> List[float]:
    """Voxel size per axis of the preprocessed case; a 2D configuration's slices are far apart."""
    spacing = [float(s) for s in spacing]
    return spacing if len(spacing) == ndim else [1e9, *spacing]


def dilate(mask: np.ndarray, sampling: Sequence[float], margin_mm: float) -> np.ndarray:
    if margin_mm <= 0 or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=sampling) <= margin_mm


def baseline_image(data: torch.Tensor, n_images: int, how: str, sampling: Sequence[float]) -> torch.Tensor:
    """What deleted voxels become: the image channels blurred, or each one's mean (one-hot channels of a cascade's
    previous stage are kept)."""
    base = data.clone()
    for c in range(n_images):
        if how == 'blur':
            sigma = [0 if s >= 1e9 else BLUR_SIGMA_MM / s for s in sampling]
            base[c] = torch.from_numpy(ndimage.gaussian_filter(data[c].float().numpy(), sigma)).to(data.dtype)
        else:
            base[c] = data[c].mean()
    return base


def _spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Rank correlation; None where a map is constant (it ranks nothing)."""
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def randomisation_groups(network: torch.nn.Module) -> List[tuple]:
    """(name, module names) from the segmentation head towards the input: each decoder stage with its upsampling
    (the first with the segmentation layers), then each encoder stage (the first with a stem, where there is one)."""
    enc, dec = getattr(network, 'encoder', None), getattr(network, 'decoder', None)
    if not (hasattr(enc, 'stages') and hasattr(dec, 'stages') and hasattr(dec, 'transpconvs')):
        raise UsageError(f'the sanity check re-initialises nnU-Net U-Net stages, and {type(network).__name__} has '
                         f'none; run --evaluate with --eval-no-sanity')
    n_dec, n_enc = len(dec.stages), len(enc.stages)
    groups = []
    for s in reversed(range(n_dec)):
        head = ['decoder.seg_layers'] if s == n_dec - 1 else []
        groups.append((f'decoder stage {s}', head + [f'decoder.stages.{s}', f'decoder.transpconvs.{s}']))
    for s in reversed(range(n_enc)):
        stem = ['encoder.stem'] if s == 0 and getattr(enc, 'stem', None) is not None else []
        groups.append((f'encoder stage {s}', [f'encoder.stages.{s}'] + stem))
    return groups


def reinitialise(module: torch.nn.Module) -> None:
    """nnU-Net's own initialisation (He, a = 1e-2) for convolutions; norms back to weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, (torch.nn.modules.conv._ConvNd,)):
            torch.nn.init.kaiming_normal_(m.weight, a=1e-2)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)) \
                and hasattr(m, 'reset_parameters'):
            m.reset_parameters()


def _auc(y, x) -> float:
    return float(np.sum((np.asarray(y[1:]) + np.asarray(y[:-1])) * np.diff(x)) / 2)


# a score difference below this is float rounding of a mean probability, not a change
SCORE_ROUNDING = 1e-6


class CaseEvaluation:
    """The evaluation of one case's maps: which classes can be evaluated and over which region, and progress over
    every prediction; `DeletionCurves` and `SanityCheck` reuse its preprocessed case and loaded networks."""

    def __init__(self, engine, data: torch.Tensor, logits: torch.Tensor, maps: torch.Tensor,
                 settings: EvaluationSettings, target_mask: Optional[torch.Tensor] = None,
                 on_step: Optional[Callable[[int, int], None]] = None):
        self.engine, self.data, self.logits, self.maps, self.s = engine, data, logits, maps, settings
        p = engine.predictor
        self.predictor, self.has_regions = p, p.label_manager.has_regions
        self.sampling = _sampling(p.configuration_manager.spacing, data.ndim - 1)
        n_images = len(p.dataset_json.get('channel_names', p.dataset_json.get('modality', {})))
        self.n_images = n_images
        self.base = baseline_image(data, n_images, settings.baseline, self.sampling)
        self.target_mask = target_mask
        self.on_step = on_step
        self.done, self.total = 0, 0

    def plan(self) -> Dict[str, dict]:
        """Per class: its mask, region and re-prediction, or why it is skipped. Sets the number of predictions."""
        out = {}
        per_ranking = max(self.s.steps - 1, 0)
        for i, t in enumerate(self.engine.targets):
            mask = self.target_mask if self.target_mask is not None else \
                predicted_mask(self.logits, [t], self.has_regions)[0]
            if not mask.any():
                out[t.name] = {'skipped': f'no voxels predicted as {t.name}: nothing to evaluate'}
                continue
            region = torch.from_numpy(dilate(mask.numpy(), self.sampling, self.s.margin_mm))
            predict = RegionPrediction(self.predictor, self.engine.networks, self.data, region)
            if len(predict.tiles) > self.s.max_tiles:
                out[t.name] = {'skipped': f'the region of {t.name} needs {len(predict.tiles)} tiles, more than '
                                          f'--eval-max-tiles {self.s.max_tiles}; raise it to evaluate this class'}
                continue
            sanity = len(randomisation_groups(self.engine.networks[0])) + 2 if self.s.sanity else 0
            out[t.name] = {'index': i, 'mask': mask, 'region': region, 'predict': predict}
            self.total += 2 + (2 + self.s.seeds) * per_ranking + sanity
        return out

    def tick(self) -> None:
        self.done += 1
        if self.on_step:
            self.on_step(self.done, max(self.total, self.done))

    def scores(self, predict: RegionPrediction, variants: List[torch.Tensor], t: Target) -> List[float]:
        """The class's mean probability (softmax, or sigmoid for a region) inside the region, per variant."""
        out = [self.score_of(logits, t) for logits in predict(variants)]
        for _ in variants:
            self.tick()
        return out

    def score_of(self, logits: torch.Tensor, t: Target) -> float:
        probs = torch.sigmoid(logits[t.channel]) if self.has_regions else torch.softmax(logits, 0)[t.channel]
        return float(probs.double().mean())

    def curves(self, t: Target, i: int, region: torch.Tensor, predict: RegionPrediction) -> dict:
        return DeletionCurves(self)(t, i, region, predict)

    def sanity(self, t: Target, mask, region) -> dict:
        return SanityCheck(self)(t, mask, region)

    def run(self) -> Dict[str, dict]:
        plans = self.plan()
        out = {}
        for t in self.engine.targets:
            pl = plans[t.name]
            if 'skipped' in pl:
                out[t.name] = {'skipped': pl['skipped']}
                continue
            res = {'region_voxels': int(pl['region'].sum()), 'region_tiles': len(pl['predict'].tiles),
                   **self.curves(t, pl['index'], pl['region'], pl['predict'])}
            if self.s.sanity:
                res['sanity'] = self.sanity(t, pl['mask'], pl['region'])
            out[t.name] = res
        return out


class DeletionCurves:
    """Deletion and insertion of the map's ranking and of random rankings; AUCs over the fraction changed. A random
    ranking's insertion is its deletion read backwards (inserting the last-ranked voxels first is deleting the
    first-ranked: the same images), so each random seed costs one curve of predictions.

    The curves run between the original case's score and the score with the whole region baseline. Only where the
    baseline lowers the score can they rank maps (ROAD, Rong et al. 2022: a removal can add information of its
    own); elsewhere the ratios are None, with the reason. The AUCs are also given normalised by that gap,
    (AUC - baseline) / (original - baseline): RISE (Petsiuk et al. 2018) compares raw AUCs of maps of the same
    image, which share both ends; the gap makes cases with other scores comparable."""

    def __init__(self, ev: CaseEvaluation):
        self.ev = ev

    def __call__(self, t: Target, i: int, region: torch.Tensor, predict: RegionPrediction) -> dict:
        ev = self.ev
        inside = region.numpy()
        cam = ev.maps[i].numpy()[inside]
        idx = np.flatnonzero(inside.ravel())
        rng = np.random.default_rng(0)
        order = np.lexsort((rng.random(cam.size), -cam))  # highest first, ties in random order
        randoms = [np.random.default_rng(1000 + seed).permutation(cam.size) for seed in range(ev.s.seeds)]
        fractions = np.linspace(0, 1, ev.s.steps + 1)
        blank = ev.data.clone()
        blank[:ev.n_images, region] = ev.base[:ev.n_images, region]
        # both ends by the same re-prediction as every step
        original, baseline = ev.scores(predict, [ev.data, blank], t)
        flat_data, flat_base = ev.data.flatten(1), ev.base.flatten(1)

        def replaced(start, source, top):
            x = start.clone().flatten(1)
            x[:ev.n_images, top] = source[:ev.n_images, top]
            return x.view_as(ev.data)

        deletion, insertion = [original], [baseline]
        random_deletion = [[original] for _ in randoms]
        for f in fractions[1:-1]:
            n = int(round(f * cam.size))
            top = idx[order[:n]]
            variants = [replaced(ev.data, flat_base, top), replaced(blank, flat_data, top)] + \
                [replaced(ev.data, flat_base, idx[r[:n]]) for r in randoms]
            s = ev.scores(predict, variants, t)
            deletion.append(s[0])
            insertion.append(s[1])
            for curve, score in zip(random_deletion, s[2:]):
                curve.append(score)
        deletion.append(baseline)
        insertion.append(original)
        for curve in random_deletion:
            curve.append(baseline)
        random_insertion = [curve[::-1] for curve in random_deletion]
        aucs = {'deletion_auc': _auc(deletion, fractions), 'insertion_auc': _auc(insertion, fractions),
                'random_deletion_auc': float(np.mean([_auc(c, fractions) for c in random_deletion])),
                'random_insertion_auc': float(np.mean([_auc(c, fractions) for c in random_insertion]))}
        return {'fractions': fractions.round(6).tolist(), 'deletion': deletion, 'insertion': insertion,
                'random_deletion': np.mean(random_deletion, 0).tolist(),
                'random_insertion': np.mean(random_insertion, 0).tolist(), **aucs,
                **self.ranking(original, baseline, aucs)}

    def ranking(self, original: float, baseline: float, aucs: dict) -> dict:
        gap = original - baseline
        out = {'original_score': original, 'baseline_score': baseline, 'can_rank': gap > SCORE_ROUNDING}
        if not out['can_rank']:
            return {**out, 'deletion_ratio': None, 'insertion_ratio': None, 'deletion_auc_normalised': None,
                    'insertion_auc_normalised': None,
                    'cannot_rank': f'the region all baseline ({self.ev.s.baseline}) scores {baseline:.4g}, not below '
                                   f'the original\'s {original:.4g}: removing it does not lower the score, so the '
                                   f'curves cannot rank maps for this case'}
        rd, ri = aucs['random_deletion_auc'], aucs['random_insertion_auc']
        return {**out,
                # below 1: the map finds what the score needs faster than chance; above 1 for insertion
                'deletion_ratio': aucs['deletion_auc'] / rd if rd > 0 else None,
                'insertion_ratio': aucs['insertion_auc'] / ri if ri > 0 else None,
                # 0: the score falls to the baseline's at once (deletion); 1: it is back at once (insertion)
                'deletion_auc_normalised': (aucs['deletion_auc'] - baseline) / gap,
                'insertion_auc_normalised': (aucs['insertion_auc'] - baseline) / gap}


class SanityCheck:
    """Cascading model-parameter randomisation and data randomisation (Adebayo et al. 2018), by rank correlation
    with the trained model's map inside the region (the same target voxels throughout). A flat map has no rank
    correlation: the check is then undefined (`passes` None), never a pass."""

    def __init__(self, ev: CaseEvaluation):
        self.ev = ev

    def _region_map(self, networks, data, t: Target, mask, region) -> np.ndarray:
        """The map of target t over `mask` (fixed: the trained model's), from the region's tiles, inside the region."""
        e = self.ev.engine
        spec = CamSpec(e.method, e.layers, [t], e.pooling, mask=mask, only_region=region)
        self.ev.tick()
        out = sliding_window_cam(self.ev.predictor, networks, data, spec)
        return combine_layers(out.cams)[0][region].numpy()

    def __call__(self, t: Target, mask, region) -> dict:
        ev = self.ev
        trained = self._region_map(ev.engine.networks, ev.data, t, mask, region)
        nets = [copy.deepcopy(n) for n in ev.engine.networks]
        steps = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for name, modules in randomisation_groups(nets[0]):
                for net in nets:
                    for m in modules:
                        reinitialise(net.get_submodule(m))
                steps.append({'randomised': f'up to {name}',
                              'spearman': _spearman(trained, self._region_map(nets, ev.data, t, mask, region))})
        n_dec = len(ev.engine.networks[0].decoder.stages)
        after_decoder = steps[n_dec - 1]['spearman']
        shuffled = ev.data.clone()
        g = torch.Generator().manual_seed(0)
        for c in range(ev.n_images):
            flat = shuffled[c].flatten()
            shuffled[c] = flat[torch.randperm(flat.numel(), generator=g)].view_as(shuffled[c])
        data_r = _spearman(trained, self._region_map(ev.engine.networks, shuffled, t, mask, region))
        out = {'model_randomisation': steps, 'spearman_after_decoder': after_decoder,
               'data_randomisation_spearman': data_r}
        if after_decoder is None:
            flat = 'the trained map' if np.ptp(trained) == 0 else 'the map once the decoder is random'
            return {**out, 'passes': None,
                    'verdict': f'is UNDEFINED in the sanity check: {flat} is flat in the region, and a constant map '
                               f'has no rank correlation; undefined is not a pass'}
        passes = after_decoder <= SANITY_LIMIT
        return {**out, 'passes': passes,
                'verdict': ('passes' if passes else 'FAILS') + f' the sanity check: rank correlation '
                           f'{after_decoder:.2f} with the trained map once the decoder is random (fails above '
                           f'{SANITY_LIMIT})'}


def mask_statistics(cam: np.ndarray, mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> dict:
    """Where a map (original geometry, peak 1) lies against a mask: its energy inside and in a ring of margin_mm
    around it, whether its maximum falls inside (pointing game), and the distance in mm between the centroid of the
    map above half its maximum and the mask's. A map that is zero everywhere has none of these (None, with the
    reason in `undefined`); an empty mask holds no energy and no maximum, and has no centroid. Sums in float64
    (float32 sums of the parts can exceed the whole's)."""
    total = float(cam.sum(dtype=np.float64))
    if total <= 0:
        return {'energy_in_mask': None, 'energy_in_ring': None, 'pointing_game': None, 'centroid_distance_mm': None,
                'mask_voxels': int(mask.sum()), 'undefined': 'the map is zero everywhere'}
    if not mask.any():
        return {'energy_in_mask': 0.0, 'energy_in_ring': 0.0, 'pointing_game': False, 'centroid_distance_mm': None,
                'mask_voxels': 0, 'undefined': 'the mask is empty: no centroid'}
    sampling = [float(s) for s in spacing]
    ring = dilate(mask, sampling, margin_mm) & ~mask
    hot = cam >= 0.5 * cam.max()
    centre = lambda m: np.array(ndimage.center_of_mass(m)) * np.array(sampling)  # noqa: E731
    return {'energy_in_mask': float(cam[mask].sum(dtype=np.float64)) / total,
            'energy_in_ring': float(cam[ring].sum(dtype=np.float64)) / total,
            'pointing_game': bool(mask.flat[int(np.argmax(cam))]),
            'centroid_distance_mm': float(np.linalg.norm(centre(hot) - centre(mask))),
            'mask_voxels': int(mask.sum())}


def require_folds(engine) -> None:
    if len(engine.networks) < 2:
        raise UsageError(f'--save-fold-spread compares folds and this run has {len(engine.networks)}; give two or '
                         f'more with -f (e.g. -f 0 1 2 3 4)')


def fold_spread(engine, data: torch.Tensor, properties: dict) -> np.ndarray:
    """(targets, *original): the voxel-wise standard deviation of the folds' own maps, each normalised to its peak;
    zero where the folds agree."""
    from .export import maps_to_original
    require_folds(engine)
    p = engine.predictor
    maps = []
    for net in engine.networks:
        spec = CamSpec(engine.method, engine.layers, engine.targets, engine.pooling, engine.region)
        m = maps_to_original(combine_layers(sliding_window_cam(p, [net], data, spec).cams), properties, p)
        peak = m.reshape(m.shape[0], -1).max(1).reshape(-1, *[1] * (m.ndim - 1))
        maps.append(np.where(peak > 0, m / np.maximum(peak, 1e-30), 0))
    return np.std(np.stack(maps), axis=0).astype(np.float32)


def plot_curves(evaluation: Dict[str, dict], path: str, case: str) -> bool:
    """Deletion and insertion curves per class, the map's against the random rankings'; False if no class has
    them."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    names = [n for n, e in evaluation.items() if 'fractions' in e]
    if not names:
        return False
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 3 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        e = evaluation[name]
        x = np.array(e['fractions']) * 100
        for ax, kind in zip(row, ('deletion', 'insertion')):
            ax.plot(x, e[kind], 'o-', color='tab:red', label=f'map (AUC {e[f"{kind}_auc"]:.3f})')
            ax.plot(x, e[f'random_{kind}'], 's--', color='gray',
                    label=f'random (AUC {e[f"random_{kind}_auc"]:.3f})')
            ax.set_title(f'{name}: {kind}' + ('' if e.get('can_rank', True) else
                                                 ' (cannot rank: the baseline does not lower the score)'), fontsize=9)
            ax.axhline(e['baseline_score'], color='tab:blue', lw=0.8, ls=':', label='region all baseline')
            ax.set_xlabel('% of the region ' + ('removed' if kind == 'deletion' else 'restored') + ', top-ranked first')
            ax.set_ylabel('mean probability in region')
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
    fig.suptitle(case)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True

