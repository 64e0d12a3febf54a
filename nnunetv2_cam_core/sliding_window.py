"""Segmentation logits and CAMs from one forward and one partial backward per tile.

Tiles, padding, step size, gaussian weighting, mirroring and fold averaging are nnU-Net's own (`nnUNetPredictor`,
`compute_gaussian`, `pad_nd_image`). Each tile's backward starts from its own target (the mask alone), and its map
is blended exactly as nnU-Net blends tile logits, sum(g * map) / sum(g): one gaussian share per voxel, so maps fade
out towards tile borders and leave no seams. Volume pooling pools the channel statistics of every tile's own target
over all tiles, then blends the same way.
The target mask of a tile is the ensemble (folds x mirrors) prediction for that tile; where overlapping tiles
disagree about a voxel, the fraction is reported as `tile_mask_disagreement`. With `uncertainty`, the same members'
logits of each tile give the uncertainty terms, stitched alongside (`uncertainty.py`).
"""
import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.utilities.helpers import empty_cache

from .errors import CamError
from .layers import LayerCache, LayerCapture, head_of
from .methods import CamMethod
from .targets import Target, predicted_mask, target_masks
from .tile_plan import TilePlan
from .uncertainty import UncertaintyMaps, UncertaintyStitch

VOLUME_POOLING_BUDGET_BYTES = 4 * 1024 ** 3


@dataclass
class CamSpec:
    method: CamMethod
    layers: List[str]
    targets: List[Target]
    pooling: Optional[str] = None     # 'tile' or 'volume' for pooled methods; None: the method's default
    region: str = 'predicted'         # 'predicted' or 'all'
    mask: Optional[torch.Tensor] = None  # bool, preprocessed space, one for all targets or (targets, ...); replaces region
    low_memory: bool = False          # one forward graph alive at a time (one extra forward per tile)
    # bool, preprocessed space: run only the tiles that overlap it. Inside it, logits and tile-pooled or
    # element-wise maps equal a full run's; outside it they are partial
    only_region: Optional[torch.Tensor] = None
    # also the gradient x input at the network input, summed per input channel (a full backward per tile)
    channel_attribution: bool = False
    # the case's target-layer outputs: kept by this run, or used instead of a forward where kept (`LayerCache`)
    layer_cache: Optional[LayerCache] = None
    uncertainty: bool = False  # also stitch the members' probabilities, mutual information and spread (all tiles)


@dataclass
class CamOutput:
    logits: torch.Tensor  # (heads, *shape) float32, preprocessed space
    cams: torch.Tensor    # (n_targets, n_layers, *shape) float32, raw (not normalised)
    n_tiles: int                      # tiles run
    tile_mask_disagreement: List[float]
    low_memory: bool = False  # also True after an out-of-memory retry
    out_of_memory_retry: bool = False
    channel_attribution: Optional[torch.Tensor] = None  # (n_targets, input channels): sum of |x * dS/dx|
    from_layer_cache: int = 0  # tile forwards replaced by the layer cache
    uncertainty: Optional[UncertaintyMaps] = None


def combine_layers(cams: torch.Tensor) -> torch.Tensor:
    """(targets, layers, *shape) -> (targets, *shape): several layers each normalised to its peak, then averaged."""
    if cams.shape[1] == 1:
        return cams[:, 0]
    peak = cams.flatten(2).amax(2).clamp(min=1e-30)
    return (cams / peak.view(*peak.shape, *[1] * (cams.ndim - 2))).mean(1)


def mirror_combinations(predictor) -> List[tuple]:
    """nnU-Net's TTA mirrors as dims of a (1, C, *spatial) tile: () first, then every combination of axes."""
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    if not axes:
        return [()]
    dims = [a + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def sliding_window_cam(predictor, networks: Sequence[torch.nn.Module], data: torch.Tensor, spec: CamSpec,
                       on_tile: Optional[Callable[[int, int], None]] = None) -> CamOutput:
    """data: preprocessed (C, *shape). Returns logits and raw CAMs on the CPU, in the same (preprocessed) space."""
    if spec.uncertainty and spec.only_region is not None:
        raise CamError('uncertainty maps need every tile of the case; run without a region to re-explain')
    padded, revert, plan, tiles = _padded_plan(predictor, data, spec.only_region, torch.device('cpu'))
    mask = None if spec.mask is None else _pad_mask(predictor, spec.mask)  # each attempt moves the plan
    device = results_device = predictor.device
    run = _SlidingWindowRun(predictor, networks, padded, mask, plan, tiles, spec, on_tile)
    retried = False
    with torch.autocast(device.type) if device.type == 'cuda' else contextlib.nullcontext():
        while True:
            try:
                out = run(results_device)
                break
            except RuntimeError as e:
                if not is_out_of_memory(e) or (run.low_memory and results_device.type == 'cpu'):
                    raise
            # out of the except block, so the traceback no longer holds the failed attempt's tensors; then, as
            # nnU-Net, input and result arrays on the CPU, and one forward graph alive at a time
            run.act_store, run.grad_store = {}, {}
            run.low_memory, results_device, retried = True, torch.device('cpu'), True
            empty_cache(device)
    out.low_memory, out.out_of_memory_retry, out.from_layer_cache = run.low_memory, retried, run.from_cache
    keep = tuple(revert[1:])
    out.logits = out.logits[(slice(None), *keep)].cpu()
    out.cams = out.cams[(slice(None), slice(None), *keep)].cpu()
    if out.uncertainty is not None:
        out.uncertainty = out.uncertainty.crop(keep)
    return out


def layer_outputs_bytes(predictor, networks: Sequence[torch.nn.Module], shape: Sequence[int]) -> int:
    """What a LayerCache of every tile x fold x mirror at the last decoder stage holds for a case of this shape
    (the layer's outputs are float16 under CUDA's autocast)."""
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    k = len(shape) - len(patch)  # a 2D model's slices axis, which nnU-Net's padding leaves as it is
    padded = tuple(shape[:k]) + tuple(max(s, p) for s, p in zip(shape[k:], patch))
    tiles = predictor._internal_get_sliding_window_slicers(padded)
    per_voxel = networks[0].decoder.seg_layers[-1].in_channels * (2 if predictor.device.type == 'cuda' else 4)
    return len(tiles) * len(networks) * len(mirror_combinations(predictor)) * math.prod(patch) * per_voxel


def _pad_mask(predictor, m: torch.Tensor) -> torch.Tensor:
    """A mask (*spatial) or per-target masks (targets, *spatial), padded as the case."""
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    per_target = m.ndim > len(patch)
    padded = pad_nd_image((m if per_target else m[None]).to(torch.uint8), patch, 'constant', {'value': 0}, True,
                          None)[0] > 0
    return padded if per_target else padded[0]


def _padded_plan(predictor, data: torch.Tensor, only_region: Optional[torch.Tensor], device: torch.device):
    """nnU-Net's padding of the case, its tile plan, and the tiles to run: all, or those overlapping the region."""
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    padded, revert = pad_nd_image(data, patch, 'constant', {'value': 0}, True, None)
    plan = TilePlan.of(predictor, padded.shape[1:], device)
    if only_region is not None and only_region.shape != data.shape[1:]:
        raise CamError(f'region of shape {list(only_region.shape)} for a case of {list(data.shape[1:])}; '
                       f'give it in the preprocessed space')
    tiles = list(range(len(plan.slicers))) if only_region is None else \
        plan.overlapping(_pad_mask(predictor, only_region))
    if not tiles:
        raise CamError('the region is empty; give at least one voxel')
    return padded, revert, plan, tiles


class RegionPrediction:
    """nnU-Net's blended logits at the voxels of one region, for many variants of a case (same shape as `data`),
    from the tiles that overlap the region alone: forwards only, every fold x mirror, each tile's gaussian share as
    in a full run (so they equal a full run's logits there). Padding and tile plan are built once; the patches of
    all variants x mirrors of a tile go through each network in batches of `batch` (halved on out-of-memory)."""

    def __init__(self, predictor, networks: Sequence[torch.nn.Module], data: torch.Tensor, region: torch.Tensor,
                 batch: Optional[int] = None):
        self.predictor, self.networks, self.device = predictor, networks, predictor.device
        _, _, plan, self.tiles = _padded_plan(predictor, data, region, self.device)
        self.plan, self.mirrors = plan, mirror_combinations(predictor)
        bounds = [[_bounds(s) for s in plan.slicers[k][1:]] for k in self.tiles]  # per tile, per axis
        self.box = tuple(slice(min(b[0] for b in axis), max(b[1] for b in axis)) for axis in zip(*bounds))
        self.inside = _pad_mask(predictor, region).to(self.device)[self.box]
        self.weights = plan.weight_sum[self.box][self.inside]
        self.batch = batch or (16 if self.device.type == 'cuda' else 2)  # CPU: 2 measured fastest per patch

    def __call__(self, variants: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per variant, (heads, region voxels)."""
        while True:
            try:
                return self._predict(variants)
            except RuntimeError as e:
                if not is_out_of_memory(e) or self.batch == 1:
                    raise
            self.batch //= 2
            empty_cache(self.device)

    def _predict(self, variants: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        patch = [int(p) for p in self.predictor.configuration_manager.patch_size]
        padded = [pad_nd_image(v, patch, 'constant', {'value': 0}, True, None)[0] for v in variants]
        heads = self.predictor.label_manager.num_segmentation_heads
        sums = torch.zeros((len(variants), heads, *[s.stop - s.start for s in self.box]), device=self.device)
        jobs = [(v, d) for v in range(len(variants)) for d in self.mirrors]
        with torch.no_grad(), torch.autocast(self.device.type) if self.device.type == 'cuda' else \
                contextlib.nullcontext():
            for k in self.tiles:
                sl = self.plan.slicers[k]
                at = tuple(s - b.start if isinstance(s, int) else slice(s.start - b.start, s.stop - b.start)
                           for s, b in zip(sl[1:], self.box))
                tiles = [x[sl].to(self.device) for x in padded]
                outs = [[] for _ in variants]  # per variant, in the full run's order: fold, then mirror
                for net in self.networks:
                    for i in range(0, len(jobs), self.batch):
                        chunk = jobs[i:i + self.batch]
                        out = net(torch.stack([tiles[v].flip([d - 1 for d in dims]) for v, dims in chunk]))
                        for (v, dims), o in zip(chunk, out):
                            outs[v].append(o.float().flip([d - 1 for d in dims]))
                for v, o in enumerate(outs):  # as the full run sums them
                    sums[(v, slice(None), *at)] += torch.stack(o).sum(0) / len(o) * self.plan.gaussian
        return [(s[:, self.inside] / self.weights).cpu() for s in sums]


def _bounds(s) -> tuple:
    """(start, stop) of a tile slicer's axis: a slice, or a 2D configuration's slice index (an int)."""
    return (s, s + 1) if isinstance(s, int) else (s.start, s.stop)


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory error, and the allocation failures cuDNN, cuBLAS or the CPU allocator report as a
    plain RuntimeError."""
    return isinstance(e, getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError)) or any(
        s in str(e) for s in ('out of memory', 'ALLOC_FAILED', "can't allocate memory", 'not enough memory'))


def upsample(feature_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A quadratic B-spline upsampling: (bi/tri)linear, then a box of one feature cell along each axis (separable,
    so a coarse layer costs a few operations per voxel). Plain linear interpolation leaves kinks on the feature grid,
    and tile borders always fall between them."""
    x = feature_map[None, None]
    nd = x.ndim - 2
    x = F.interpolate(x, size=list(size), mode='bilinear' if nd == 2 else 'trilinear', align_corners=False)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    for axis, (s, f) in enumerate(zip(size, feature_map.shape)):
        k = int(round(s / f)) // 2 * 2 + 1  # odd, about one cell
        if k > 1:
            pad = [0, 0] * nd
            pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = k // 2
            kernel = [1] * nd
            kernel[axis] = k
            x = pool(F.pad(x, pad, mode='replicate'), kernel, stride=1)
    return x[0, 0]


class _SlidingWindowRun:
    def __init__(self, predictor, networks, padded, mask, plan: TilePlan, tiles: List[int], spec: CamSpec, on_tile):
        self.predictor, self.networks, self.padded, self.mask = predictor, networks, padded, mask
        self.plan, self.tiles, self.spec, self.on_tile, self.low_memory = plan, tiles, spec, on_tile, spec.low_memory
        self.mirrors = mirror_combinations(predictor)
        self.patch = [int(p) for p in predictor.configuration_manager.patch_size]
        self.volume_pooling = spec.method.pooled and (spec.pooling or spec.method.default_pooling) == 'volume'
        self.reported = 0  # tiles reported to on_tile: a retry after out-of-memory does not run progress backwards
        cache = spec.layer_cache
        heads = [head_of(n, spec.layers) for n in networks] if cache is not None and not cache.off \
            and cache.layer == spec.layers[0] and not spec.channel_attribution else []
        self.heads = heads if heads and None not in heads else None  # per fold: output from the layer's
        self.from_cache, self.kept_now = 0, set()

    def __call__(self, results_device: torch.device) -> CamOutput:
        p, spec = self.predictor, self.spec
        self.results_device, self.from_cache, self.kept_now = results_device, 0, set()
        shape = self.padded.shape[1:]
        plan = self.plan.to(results_device)
        n_t, n_l = len(spec.targets), len(spec.layers)
        logits = torch.zeros((p.label_manager.num_segmentation_heads, *shape), device=results_device)
        cams = torch.zeros((n_t, n_l, *shape), device=results_device)
        track = spec.mask is None and spec.region == 'predicted'
        hits = torch.zeros((n_t, *shape), dtype=torch.int16, device=results_device) if track else None
        coverage = torch.zeros(shape, dtype=torch.int16, device=results_device) if track else None
        lm = p.label_manager
        unc = UncertaintyStitch(lm.num_segmentation_heads, lm.has_regions, [t.channel for t in spec.targets], shape,
                                len(self.networks) * len(self.mirrors), results_device) if spec.uncertainty else None
        self.act_store, self.grad_store = {}, {}
        data = self.padded.to(results_device)
        self.attribution = torch.zeros((n_t, data.shape[0]), device=results_device) if spec.channel_attribution \
            else None
        captures = [LayerCapture(net, spec.layers, cut=not spec.channel_attribution) for net in self.networks]
        try:
            for j, k in enumerate(self.tiles):
                sl = plan.slicers[k]
                share = None if self.volume_pooling else plan.share(k).to(p.device)
                tile_logits, masks, members = self._tile(k, data[sl][None].to(p.device), captures, share, cams, sl)
                logits[sl] += tile_logits.to(results_device) * plan.gaussian
                if unc is not None:
                    unc.add(members, sl, plan.gaussian.to(members.device))
                if track:
                    hits[(slice(None), *sl[1:])] += masks.to(results_device)
                    coverage[sl[1:]] += 1
                if self.on_tile and j + 1 > self.reported:
                    self.reported = j + 1
                    self.on_tile(j + 1, len(self.tiles))
        finally:
            for c in captures:
                c.__exit__()
        logits /= plan.weight_sum
        if self.volume_pooling:
            self._volume_pooled_maps(cams, plan)
        if not spec.method.uses_gradients:
            cams[1:] = cams[0]
        disagreement = [0.0] * n_t
        if track:
            final = predicted_mask(logits, spec.targets, p.label_manager.has_regions)
            for i in range(n_t):
                split = (final[i] & (hits[i] < coverage)) | (~final[i] & (hits[i] > 0))
                disagreement[i] = float(split.sum()) / max(1, int(final[i].sum()))
        return CamOutput(logits, cams, len(self.tiles), disagreement, channel_attribution=self.attribution,
                         uncertainty=None if unc is None else unc.finish(plan.weight_sum))

    def _forward(self, f, cap, dims, x, key):
        """One forward of a tile by fold f: (output mirrored back, target-layer outputs). Where the layer cache
        holds this forward's layer output, the segmentation layer alone makes the output from it."""
        cap.outputs = {}
        kept = self.spec.layer_cache.get(key) if self.heads else None
        if kept is not None:
            a = kept.to(x.device).detach().requires_grad_(torch.is_grad_enabled())
            cap.outputs[self.spec.layers[0]] = a
            out = self.heads[f](a)
            self.from_cache += key not in self.kept_now  # a low-memory second pass replays this run's own
        else:
            out = self.networks[f](x.flip(dims) if dims else x)
            missing = [n for n in self.spec.layers if n not in cap.outputs]
            if missing:
                raise CamError(f'target layer {missing[0]} is not used in the forward pass at inference; '
                               f'pick another (--list-layers marks the unused ones)')
            if self.heads:
                cache, kept = self.spec.layer_cache, cap.outputs[self.spec.layers[0]]
                if cache.check(f, self.heads[f], kept, out):
                    cache.keep(key, kept)
                    self.kept_now.add(key)
        return (out.flip(dims) if dims else out), [cap.outputs[n] for n in self.spec.layers]

    def _each_forward(self, captures):
        """(fold, its capture, mirror dims, forward index) in the ensemble's order: fold, then mirror."""
        pairs = [(f, cap, dims) for f, cap in enumerate(captures) for dims in self.mirrors]
        return [(f, cap, dims, j) for j, (f, cap, dims) in enumerate(pairs)]

    def _forwards(self, k, x, captures):
        """Every fold x mirror forward of tile k: (outputs mirrored back, target-layer outputs per forward)."""
        runs = [self._forward(f, cap, dims, x, (k, j)) for f, cap, dims, j in self._each_forward(captures)]
        return [r[0] for r in runs], [r[1] for r in runs]

    def _tile(self, k, x, captures, share, cams, sl):
        spec, method = self.spec, self.spec.method
        n = len(self.networks) * len(self.mirrors)
        # all graphs of the tile stay alive until the ensemble gives the target mask; low_memory instead recomputes
        # each forward with its graph after a gradient-free pass (one graph at a time, one extra forward)
        keep_graphs = method.uses_gradients and not self.low_memory
        if self.attribution is not None:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad() if keep_graphs else torch.no_grad():
            outs, acts = self._forwards(k, x, captures)
        members = torch.stack([o.float() for o in outs])  # float16 under autocast: sum in float32
        tile_logits = members.sum(0)[0] / n
        region_mask = None if self.mask is None else self.mask[(Ellipsis, *sl[1:])].to(tile_logits.device)
        masks = target_masks(tile_logits.detach(), spec.targets, self.predictor.label_manager.has_regions,
                             spec.region, region_mask)
        grads = [None] * len(spec.targets)
        if method.uses_gradients:
            active = [i for i in range(len(spec.targets)) if masks[i].any()]
            upstreams = {}
            for i in active:
                upstreams[i] = torch.zeros_like(tile_logits)
                upstreams[i][spec.targets[i].channel] = masks[i]
            if keep_graphs:
                leaves = [a for per in acts for a in per]
                for j, i in enumerate(active):
                    g, grad_x = self._grad(tile_logits, leaves, x, upstreams[i], retain=j < len(active) - 1)
                    if grad_x is not None:
                        self._attribute(i, x, grad_x * n, masks[i])
                    # undo the 1/(folds*mirrors) of the average: each forward's map is a full map of that network
                    grads[i] = [torch.zeros_like(a) if gi is None else gi * n for gi, a in zip(g, leaves)]
            elif active:
                acts = self._backward_one_at_a_time(k, x, captures, active, upstreams, grads, masks)
        tile_logits = tile_logits.detach()
        for l in range(len(spec.layers)):
            A = torch.cat([acts[j][l].detach() for j in range(n)])
            if self.volume_pooling:
                self._keep_activations(k, l, A)
            # a gradient-free map is class-agnostic: computed for the first target, copied to the others at the end
            for i in range(len(spec.targets) if method.uses_gradients else 1):
                G = None
                if method.uses_gradients:
                    if grads[i] is None and not self.volume_pooling:
                        continue  # target absent from this tile: zero contribution
                    G = torch.zeros_like(A) if grads[i] is None else \
                        torch.cat([grads[i][j * len(spec.layers) + l] for j in range(n)])
                if self.volume_pooling:
                    self.grad_store[(k, i, l)] = None if G is None else G.to(self.results_device)
                    continue
                raw = method(A, G, tuple(range(2, A.ndim))).clamp(min=0)
                cams[(i, l, *sl[1:])] += self._to_tile(raw, share).to(self.results_device)
        return tile_logits, masks, members.detach()[:, 0]

    def _backward_one_at_a_time(self, k, x, captures, active, upstreams, grads, masks) -> list:
        """Each forward again, with its graph, and its backward right away: same gradients as the joint backward
        of the ensemble (it is a sum), one graph alive at a time. Returns the recomputed target-layer outputs."""
        acts, grads_x = [], {i: 0 for i in active}
        for i in active:
            grads[i] = []
        for f, cap, dims, n in self._each_forward(captures):
            with torch.enable_grad():
                out, leaves = self._forward(f, cap, dims, x, (k, n))
                out = out.float()[0]
                for j, i in enumerate(active):
                    g, grad_x = self._grad(out, leaves, x, upstreams[i], retain=j < len(active) - 1)
                    grads[i] += [torch.zeros_like(a) if gi is None else gi for gi, a in zip(g, leaves)]
                    if grad_x is not None:
                        grads_x[i] = grads_x[i] + grad_x
            acts.append([a.detach() for a in leaves])
        if self.attribution is not None:
            for i in active:
                self._attribute(i, x, grads_x[i], masks[i])
        return acts

    def _grad(self, out, leaves, x, upstream, retain: bool):
        """Gradients of a target's score at the target layers, and with channel attribution at the tile input."""
        inputs = leaves + ([x] if self.attribution is not None else [])
        g = torch.autograd.grad(out, inputs, grad_outputs=upstream, retain_graph=retain, allow_unused=True)
        return g[:len(leaves)], (g[-1] if self.attribution is not None else None)

    def _attribute(self, i, x, grad_x, mask) -> None:
        """|x * dS/dx| over target i's voxels, summed per input channel (signed sums say nothing: instance norm
        makes the network blind to the input's scale, so they add up to zero)."""
        xg = (x.detach() * grad_x).abs()[0].float() * mask
        self.attribution[i] += xg.flatten(1).sum(1).to(self.attribution.device)

    def _to_tile(self, raw: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """(folds*mirrors, *feat) maps -> un-mirrored mean, upsampled to the tile on the device, times g / sum(g)."""
        n_m = len(self.mirrors)
        flipped = [raw[j].flip([d - 2 for d in self.mirrors[j % n_m]]) if self.mirrors[j % n_m] else raw[j]
                   for j in range(raw.shape[0])]
        return upsample(torch.stack(flipped).mean(0), self.patch) * share

    def _keep_activations(self, k, l, A):
        if not self.act_store:
            factor = 1 + (len(self.spec.targets) if self.spec.method.uses_gradients else 0)
            need = A.numel() * A.element_size() * factor * len(self.tiles) * len(self.spec.layers)
            if need > VOLUME_POOLING_BUDGET_BYTES:
                raise CamError(f'--pooling volume would keep {need / 1024 ** 3:.1f} GiB of tile activations at '
                               f'this layer; use --pooling tile or a deeper --target-layer')
        self.act_store[(k, l)] = A.to(self.results_device)

    def _volume_pooled_maps(self, cams, plan: TilePlan):
        """One weight vector (or principal component) per target, layer and fold from all tiles run and mirrors."""
        n_m, n_f = len(self.mirrors), len(self.networks)
        method = self.spec.method
        for i in range(len(self.spec.targets) if method.uses_gradients else 1):
            for l in range(len(self.spec.layers)):
                per_fold = []
                for f in range(n_f):
                    fold = slice(f * n_m, (f + 1) * n_m)
                    A = torch.cat([self.act_store[(k, l)][fold] for k in self.tiles]).float()
                    G = torch.cat([self.grad_store[(k, i, l)][fold] for k in self.tiles]).float() \
                        if method.uses_gradients else None
                    per_fold.append(method(A, G, (0,) + tuple(range(2, A.ndim))).clamp(min=0).split(n_m))
                for j, k in enumerate(self.tiles):
                    raw = torch.cat([per_fold[f][j] for f in range(n_f)])
                    share = plan.share(k).to(raw.device)
                    cams[(i, l, *plan.slicers[k][1:])] += self._to_tile(raw, share).to(cams.device)
        self.act_store, self.grad_store = {}, {}
