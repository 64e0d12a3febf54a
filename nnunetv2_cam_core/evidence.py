"""Figures against known evidence: where the image itself says what a model should look at (inserted lesions, whose
voxels are where the image differs from the same subject without them). Maps and masks on one grid, (z, y, x)."""
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .evaluation import _spearman, dilate


def energy_share(cam: np.ndarray, mask: np.ndarray) -> Optional[float]:
    """The share of the map's energy on the mask; None for an empty map (it points nowhere)."""
    total = float(cam.sum(dtype=np.float64))
    return float(cam[mask].sum(dtype=np.float64)) / total if total > 0 else None


def lesion_figures(cam: np.ndarray, instances: np.ndarray, contrast: np.ndarray, spacing: Sequence[float],
                   margin_mm: float = 10.0) -> List[Dict]:
    """Per lesion (instance label k > 0), inside its neighbourhood (the lesion dilated by margin_mm):
    - pointing: the map's maximum there falls on the lesion (None where the map is 0 throughout: no maximum);
    - spearman: rank correlation of map and |contrast| (image with lesions minus image without) there (None where
      either is constant);
    - energy: the lesion's share of the map's energy in the neighbourhood."""
    rows = []
    for k in range(1, int(instances.max(initial=0)) + 1):
        lesion = instances == k
        if not lesion.any():
            continue
        near = dilate(lesion, spacing, margin_mm)
        # the neighbourhood's bounding box: the figures only look there
        box = ndimage.find_objects(near.astype(np.uint8))[0]
        c, les, nb, con = cam[box], lesion[box], near[box], np.abs(contrast[box])
        values = np.where(nb, c, -np.inf)
        peak = c[nb].max()
        rows.append({'lesion': k, 'voxels': int(lesion.sum()),
                     'pointing': bool(les.flat[int(np.argmax(values))]) if peak > 0 else None,
                     'spearman': _spearman(c[nb], con[nb]),
                     'energy': energy_share(np.where(nb, c, 0), les)})
    return rows


def summary(rows: List[Dict], cam: np.ndarray, lesions: np.ndarray) -> Dict:
    """A case's known-evidence figures: energy on all lesions, the pointing-game hit rate over lesions with a map
    maximum, and the median Spearman correlation over lesions where it is defined."""
    hits = [r['pointing'] for r in rows if r['pointing'] is not None]
    rhos = [r['spearman'] for r in rows if r['spearman'] is not None]
    return {'lesions': len(rows), 'energy_on_lesions': energy_share(cam, lesions),
            'pointing_hit_rate': float(np.mean(hits)) if hits else None,
            'spearman_median': float(np.median(rhos)) if rhos else None}
