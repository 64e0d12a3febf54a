"""What a map explains: a class or region (by value or dataset.json name), its output channel, and the voxels
summed over."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .errors import UsageError
from .labels import output_classes


@dataclass
class Target:
    label: int    # the value the segmentation file holds for it (regions: its regions_class_order entry)
    name: str     # its dataset.json name
    channel: int  # network output channel
    labels: Tuple[int, ...] = ()  # the label values it covers in the segmentation file (default: (label,))

    def __post_init__(self):
        self.labels = tuple(self.labels) or (self.label,)


def resolve_targets(label_manager, dataset_json: dict, specs: Sequence[Union[int, str]]) -> List[Target]:
    """Classes or regions by dataset.json name or by the value the segmentation file holds for them."""
    classes = output_classes(dataset_json)
    if len(classes) != label_manager.num_segmentation_heads - (0 if label_manager.has_regions else 1):
        raise UsageError('dataset.json\'s labels do not match the network\'s outputs; use the dataset.json the model '
                         'was trained with')
    offset = 0 if label_manager.has_regions else 1  # label models: channel 0 is the background
    all_targets = [Target(value, name, k + offset, labels) for k, (name, (value, labels)) in enumerate(classes.items())]
    by_name = {t.name: t for t in all_targets}
    by_value = {t.label: t for t in all_targets}
    out = []
    for spec in specs:
        s = str(spec)
        t = by_value.get(int(s)) if s.lstrip('-').isdigit() else by_name.get(s)
        if t is None:
            ignore = dataset_json['labels'].get('ignore')
            why = ' (the ignore label marks unannotated voxels; it is no class)' if s in ('ignore', str(ignore)) else ''
            choices = ', '.join(f'{t.label} ({t.name})' for t in all_targets)
            raise UsageError(f'unknown target class {spec!r}{why}; this model has: {choices}')
        out.append(t)
    if len({t.channel for t in out}) != len(out):
        raise UsageError(f'target class given twice in {list(specs)}; list each class once')
    return out


def predicted_mask(logits: torch.Tensor, targets: Sequence[Target], has_regions: bool) -> torch.Tensor:
    """(n_targets, *spatial) bool: the voxels the model predicts as each target (Seg-Grad-CAM); a region's own
    sigmoid channel > 0.5, so regions overlap as nnU-Net's do."""
    if has_regions:
        return torch.stack([logits[t.channel] > 0 for t in targets])
    am = logits.argmax(0)
    return torch.stack([am == t.channel for t in targets])


def target_masks(logits: torch.Tensor, targets: Sequence[Target], has_regions: bool, region: str,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The voxels of each target's channel that the score sums over, for one tile."""
    if mask is not None:  # one for every target, or one each
        return mask if mask.ndim == logits.ndim else mask.expand(len(targets), *mask.shape)
    if region == 'all':
        return torch.ones((len(targets), *logits.shape[1:]), dtype=torch.bool, device=logits.device)
    return predicted_mask(logits, targets, has_regions)
