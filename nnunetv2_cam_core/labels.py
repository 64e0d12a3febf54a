"""What a model can explain, from dataset.json alone (no torch: the Slicer panel reads it too)."""
from typing import Dict, Tuple


def _values(v) -> Tuple[int, ...]:
    return tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def has_regions(dataset_json: dict) -> bool:
    """As nnU-Net decides it: some label lists more than one value."""
    return any(len(_values(v)) > 1 for n, v in dataset_json['labels'].items())


def output_classes(dataset_json: dict) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
    """dataset.json name -> (value in the segmentation file, label values it covers), in output-channel order as
    nnU-Net's LabelManager has them: no background, no ignore label; a region model's k-th region is output k and
    is painted with regions_class_order[k]."""
    fg = [(n, _values(v)) for n, v in dataset_json['labels'].items() if n != 'ignore' and set(_values(v)) != {0}]
    if not has_regions(dataset_json):
        return {n: (v[0], v) for n, v in sorted(fg, key=lambda nv: nv[1][0])}
    order = dataset_json.get('regions_class_order') or []
    return {n: (int(order[k]) if k < len(order) else k + 1, v) for k, (n, v) in enumerate(fg)}
