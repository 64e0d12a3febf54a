"""How sure the ensemble is. The members are nnU-Net's own: every fold x mirror forward of a tile. Per tile, from
the members' probabilities p_m (softmax; sigmoid per region):
  P_t   = mean_m p_m                      the ensemble's probability
  MI_t  = H(P_t) - mean_m H(p_m)          mutual information between prediction and member (0 with one member)
  V_t   = mean_m (p_m - P_t)^2            the members' variance of each explained class's probability
and each is stitched with nnU-Net's gaussian as the logits are, sum(g * x_t) / sum(g). The entropy map is H(P) of the
stitched P. P is the members' mean probability; nnU-Net's probabilities are the softmax of the stitched mean logits
(`--save_probabilities`): the two agree where members and tiles agree (softmax moves by at most half its input's
change, so they differ by at most half the mean absolute deviation of the logits). H is the Shannon entropy in nats:
over the classes for a label model (0 .. log K), the binary entropy of each region for a region model (0 .. log 2).
Since H is concave, 0 <= MI_t <= H(P_t), and sum(w_t H(P_t)) <= H(P), so 0 <= MI <= entropy voxel by voxel."""
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


RING_MM = 5.0  # the sidecar's ring around a class's predicted mask


def probabilities(logits: torch.Tensor, has_regions: bool, dim: int = 0) -> torch.Tensor:
    """nnU-Net's inference nonlinearity: softmax over the classes, or a sigmoid per region."""
    return torch.sigmoid(logits) if has_regions else torch.softmax(logits, dim)


def entropy(p: torch.Tensor, has_regions: bool, dim: int = 0) -> torch.Tensor:
    """Shannon entropy (nats) over `dim` (kept, size 1) for classes; per channel (binary) for regions."""
    plogp = torch.special.xlogy(p, p)
    if has_regions:
        return -(plogp + torch.special.xlogy(1 - p, 1 - p))
    return -plogp.sum(dim, keepdim=True)


def max_entropy(heads: int, has_regions: bool) -> float:
    return math.log(2) if has_regions else math.log(heads)


@dataclass
class TileUncertainty:
    """Per tile, (channels, *patch) each: P_t, MI_t (1 channel, or one per region) and V_t (explained classes)."""
    mean: torch.Tensor
    mutual_info: torch.Tensor
    variance: torch.Tensor

    @classmethod
    def of(cls, member_logits: torch.Tensor, has_regions: bool, channels: Sequence[int]) -> 'TileUncertainty':
        """member_logits: (members, heads, *patch), float32."""
        p = probabilities(member_logits, has_regions, dim=1)
        mean = p.mean(0)
        mi = entropy(mean, has_regions) - entropy(p, has_regions, dim=1).mean(0)
        chosen = p[:, list(channels)]
        variance = (chosen - chosen.mean(0)).square().mean(0)
        return cls(mean, mi, variance)


@dataclass
class UncertaintyMaps:
    """Stitched, in the case's (preprocessed or padded) space."""
    mean_probabilities: torch.Tensor  # (heads, *shape): P
    entropy: torch.Tensor             # (1 or regions, *shape): H(P)
    mutual_info: torch.Tensor         # (1 or regions, *shape)
    prob_std: torch.Tensor            # (explained classes, *shape)
    members: int

    def crop(self, keep: tuple) -> 'UncertaintyMaps':
        return UncertaintyMaps(*[x[(slice(None), *keep)].cpu() for x in
                                 (self.mean_probabilities, self.entropy, self.mutual_info, self.prob_std)],
                               self.members)


class UncertaintyStitch:
    """The gaussian-weighted sums of the per-tile terms, on the run's results device."""

    def __init__(self, heads: int, has_regions: bool, channels: Sequence[int], shape, members: int, device):
        self.has_regions, self.channels, self.members = has_regions, list(channels), members
        zeros = lambda n: torch.zeros((n, *shape), device=device)  # noqa: E731
        self.mean, self.mutual_info = zeros(heads), zeros(heads if has_regions else 1)
        self.variance = zeros(len(self.channels))

    def add(self, member_logits: torch.Tensor, sl, gaussian: torch.Tensor) -> None:
        t = TileUncertainty.of(member_logits, self.has_regions, self.channels)
        for total, x in ((self.mean, t.mean), (self.mutual_info, t.mutual_info), (self.variance, t.variance)):
            total[(slice(None), *sl[1:])] += (x * gaussian).to(total.device)

    def finish(self, weight_sum: torch.Tensor) -> UncertaintyMaps:
        mean = self.mean / weight_sum
        return UncertaintyMaps(mean, entropy(mean, self.has_regions), self.mutual_info / weight_sum,
                               (self.variance / weight_sum).sqrt(), self.members)


def mask_summary(entropy_map, mutual_info, mask, ring, h_max: float) -> dict:
    """Mean entropy and MI (nats) inside a class's predicted mask and in the ring around it, and the share of the
    mask's voxels whose entropy is above half its maximum; None where the mask or ring is empty. Float64 sums."""
    def mean(x, where):
        return float(x[where].mean(dtype=np.float64)) if where.any() else None
    return {'entropy_in_mask': mean(entropy_map, mask), 'entropy_in_ring': mean(entropy_map, ring),
            'mutualinfo_in_mask': mean(mutual_info, mask), 'mutualinfo_in_ring': mean(mutual_info, ring),
            'uncertain_share_in_mask': mean(entropy_map > h_max / 2, mask), 'max_entropy': h_max}
