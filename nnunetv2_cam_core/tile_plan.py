"""The tile plan of a case: nnU-Net's tiles over the padded case, its gaussian, each tile's share of a stitched
voxel, and which tiles a region needs (to re-predict or re-explain a region, only those run)."""
from dataclasses import dataclass
from typing import List, Sequence

import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

MANY_TILES = 5000  # a case with more is warned about (CLI) or refused (server, --max-tiles)


@dataclass
class TilePlan:
    slicers: list               # nnU-Net's, over the padded case: (slice(None), *spatial slices)
    gaussian: torch.Tensor      # nnU-Net's tile weights (ones without --use_gaussian)
    weight_sum: torch.Tensor    # sum of the gaussian over every tile of the case

    @classmethod
    def of(cls, predictor, padded_shape: Sequence[int], device: torch.device) -> 'TilePlan':
        patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
        slicers = predictor._internal_get_sliding_window_slicers(tuple(padded_shape))
        gaussian = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=device) \
            if predictor.use_gaussian else torch.ones(patch, device=device)
        weight_sum = torch.zeros(tuple(padded_shape), device=device)
        for sl in slicers:
            weight_sum[sl[1:]] += gaussian
        return cls(slicers, gaussian, weight_sum)

    def to(self, device: torch.device) -> 'TilePlan':
        return TilePlan(self.slicers, self.gaussian.to(device), self.weight_sum.to(device))

    def share(self, k: int) -> torch.Tensor:
        """Tile k's weight in each stitched voxel it covers, g / sum(g): the same whichever tiles run."""
        return self.gaussian / self.weight_sum[self.slicers[k][1:]]

    def overlapping(self, region: torch.Tensor) -> List[int]:
        """The tiles whose box holds a voxel of `region` (bool, padded shape): every stitched value inside the
        region comes from these tiles alone."""
        return [k for k, sl in enumerate(self.slicers) if bool(region[sl[1:]].any())]


def tile_count(shape: Sequence[int], patch: Sequence[int], step: float) -> int:
    """nnU-Net's number of tiles over a case of spatial `shape` (a 2D patch tiles each slice), without listing them."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    shape, n = list(shape), 1
    if len(patch) < len(shape):
        n, shape = shape[0], shape[1:]
    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    for steps in compute_steps_for_sliding_window(padded, [int(p) for p in patch], step):
        n *= len(steps)
    return n
