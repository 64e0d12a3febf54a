"""What a map explains: a class (by index or dataset.json name), its output channel, and the voxels summed over."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from .errors import UsageError


@dataclass
class Target:
    label: int    # label value in dataset.json
    name: str     # label name in dataset.json
    channel: int  # network output channel


def resolve_targets(label_manager, dataset_json: dict, specs: Sequence[Union[int, str]]) -> List[Target]:
    """Classes by index or by dataset.json label name; region-based models map a label to its region channel."""
    names = {}
    for name, value in dataset_json['labels'].items():
        # region models list a tuple of labels per region; the region is named after its first label
        names[name] = value if isinstance(value, int) else value[0] if isinstance(value, (list, tuple)) else int(value)
    by_value = {v: k for k, v in names.items()}
    if label_manager.has_regions:
        channel_of = {int(lab): i for i, lab in enumerate(label_manager.regions_class_order)}
    else:
        channel_of = {v: v for v in by_value if v != 0}
    out = []
    for spec in specs:
        s = str(spec)
        value = int(s) if s.lstrip('-').isdigit() else names.get(s)
        if value is None or value not in channel_of:
            choices = ', '.join(f'{v} ({by_value.get(v, "?")})' for v in sorted(channel_of))
            raise UsageError(f'unknown target class {spec!r}; this model has: {choices}')
        out.append(Target(value, by_value.get(value, str(value)), channel_of[value]))
    if len({t.label for t in out}) != len(out):
        raise UsageError(f'target class given twice in {list(specs)}; list each class once')
    return out


def predicted_mask(logits: torch.Tensor, targets: Sequence[Target], has_regions: bool) -> torch.Tensor:
    """(n_targets, *spatial) bool: the voxels the model predicts as each target (Seg-Grad-CAM)."""
    if has_regions:
        return torch.stack([logits[t.channel] > 0 for t in targets])
    am = logits.argmax(0)
    return torch.stack([am == t.channel for t in targets])


def target_masks(logits: torch.Tensor, targets: Sequence[Target], has_regions: bool, region: str,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The voxels of each target's channel that the score sums over, for one tile."""
    if mask is not None:
        return mask.expand(len(targets), *mask.shape)
    if region == 'all':
        return torch.ones((len(targets), *logits.shape[1:]), dtype=torch.bool, device=logits.device)
    return predicted_mask(logits, targets, has_regions)
