"""CAM methods in torch, for 2D and 3D feature maps alike.

Every method maps activations A and gradients G, both (N, K, *spatial), to a raw map (N, *spatial), before ReLU.
`pool_dims` are the dimensions channel statistics are pooled over: the spatial ones for one weight vector per
tile (and mirror), or also dim 0 for one weight vector over all tiles (volume pooling).
The formulas follow pytorch-grad-cam, which the tests use as the numerical reference.
"""
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError


class CamMethod:
    name = ''
    uses_gradients = True
    pooled = True  # channel weights pooled over a region: --pooling applies
    # gradient weights per tile, principal components per volume: chosen on one build of one tiny model (README:
    # benchmarks/tiling_invariance.py shows the ranking changes between builds)
    default_pooling = 'tile'

    def __call__(self, A: torch.Tensor, G: Optional[torch.Tensor], pool_dims: Sequence[int]) -> torch.Tensor:
        """The raw map in float32 and outside any autocast: float16 sums and covariances over many positions
        overflow (CUDA autocast would run the eigen methods' matmuls in float16)."""
        with torch.autocast(A.device.type, enabled=False) if A.device.type in ('cuda', 'cpu') else nullcontext():
            return self.cam(A.float(), None if G is None else G.float(), pool_dims)

    def get_cam_weights(self, A, G, pool_dims):
        raise NotImplementedError

    def cam(self, A: torch.Tensor, G: Optional[torch.Tensor], pool_dims: Sequence[int]) -> torch.Tensor:
        return (self.get_cam_weights(A, G, pool_dims) * A).sum(1)


class GradCAM(CamMethod):
    name = 'gradcam'

    def get_cam_weights(self, A, G, pool_dims):
        return G.mean(pool_dims, keepdim=True)


class GradCAMPlusPlus(CamMethod):
    name = 'gradcam++'

    def get_cam_weights(self, A, G, pool_dims):
        g2 = G ** 2
        sum_a = A.sum(pool_dims, keepdim=True)
        aij = g2 / (2 * g2 + sum_a * g2 * G + 1e-6)  # pytorch-grad-cam's constant
        aij = torch.where(G != 0, aij, torch.zeros_like(aij))
        return (G.clamp(min=0) * aij).sum(pool_dims, keepdim=True)


class XGradCAM(CamMethod):
    name = 'xgradcam'

    def get_cam_weights(self, A, G, pool_dims):
        return (G * A).sum(pool_dims, keepdim=True) / (A.sum(pool_dims, keepdim=True) + 1e-7)


class HiResCAM(CamMethod):
    name = 'hirescam'
    pooled = False

    def cam(self, A, G, pool_dims):
        return (G * A).sum(1)


class GradCAMElementWise(CamMethod):
    name = 'gradcamelementwise'
    pooled = False

    def cam(self, A, G, pool_dims):
        return (G * A).clamp(min=0).sum(1)


class LayerCAM(CamMethod):
    name = 'layercam'
    pooled = False

    def cam(self, A, G, pool_dims):
        return (G.clamp(min=0) * A).sum(1)


def principal_projection(X: torch.Tensor, pool_dims: Sequence[int]) -> torch.Tensor:
    """Projection of X (N, K, *spatial) on its first principal component over pool_dims, sign fixed so that the
    largest magnitude is positive (pytorch-grad-cam's Seg-Eigen-CAM convention)."""
    X = X.float()
    per_sample = 0 not in pool_dims
    groups = [X[i:i + 1] for i in range(X.shape[0])] if per_sample else [X]
    out = []
    for x in groups:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (K, P)
        flat = flat - flat.mean(1, keepdim=True)
        cov = (flat @ flat.T).double()
        v = torch.linalg.eigh(cov).eigenvectors[:, -1].to(flat.dtype)
        proj = (v @ flat).reshape(x.shape[0], *x.shape[2:])
        out.append(proj if proj.max() >= -proj.min() else -proj)
    return torch.cat(out)


class EigenCAM(CamMethod):
    name = 'eigencam'
    uses_gradients = False
    default_pooling = 'volume'

    def cam(self, A, G, pool_dims):
        return principal_projection(A, pool_dims)


class EigenGradCAM(CamMethod):
    name = 'eigengradcam'
    default_pooling = 'volume'

    def cam(self, A, G, pool_dims):
        return principal_projection(G * A, pool_dims)


class SegXResCAM(CamMethod):
    """HiResCAM with gradients pooled over pool_size windows (Hasany et al. 2023)."""
    name = 'segxrescam'
    pooled = False

    def __init__(self, pool_size: int = 2, pool_mode: str = 'max'):
        self.pool_size, self.pool_mode = pool_size, pool_mode

    def cam(self, A, G, pool_dims):
        nd = G.ndim - 2
        pool = {('max', 2): F.max_pool2d, ('max', 3): F.max_pool3d,
                ('mean', 2): F.avg_pool2d, ('mean', 3): F.avg_pool3d}[(self.pool_mode, nd)]
        k = [min(self.pool_size, s) for s in G.shape[2:]]
        pooled = pool(G.float(), k, k, ceil_mode=True)
        # voxel i lies in window i // k (the last window may be shorter)
        for axis, (kk, n) in enumerate(zip(k, G.shape[2:])):
            pooled = pooled.repeat_interleave(kk, dim=axis + 2).narrow(axis + 2, 0, n)
        return (pooled.to(A.dtype) * A).sum(1)


class GradCamLibraryMethod(CamMethod):
    """Adapter: a pytorch-grad-cam method's own get_cam_image on our activations (CPU numpy, per tile)."""
    pooled = False  # the library pools per tile itself

    def __init__(self, name: str, cls_name: str, uses_gradients: bool, **attrs):
        self.name, self.cls_name, self.uses_gradients, self.attrs = name, cls_name, uses_gradients, attrs

    def cam(self, A, G, pool_dims):
        import pytorch_grad_cam  # lazy: heavy import (torchvision, cv2, sklearn)
        get_cam_image = getattr(pytorch_grad_cam, self.cls_name).get_cam_image
        a = A.detach().float().cpu().numpy()
        g = None if G is None else G.detach().float().cpu().numpy()
        # the method's maths only, with its parameters; no hooks or forward of its own
        out = get_cam_image(SimpleNamespace(**self.attrs), None, None, None, a, g, False)
        return torch.as_tensor(out, device=A.device, dtype=torch.float32)


NATIVE = {m.name: m for m in (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, GradCAMElementWise, LayerCAM, EigenCAM,
                              EigenGradCAM, SegXResCAM)}
ADAPTED = {
    'fem': dict(cls_name='FEM', uses_gradients=False, k=2),
    'kpcacam': dict(cls_name='KPCA_CAM', uses_gradients=False, kernel='sigmoid', gamma=None),
}
UNAVAILABLE = {
    'scorecam': 'it upsamples with 2D-only code and needs one forward per channel per tile',
    'ablationcam': "pytorch-grad-cam's ablation layer is 2D-only (the old tool's AblationCAM3D raises TypeError)",
    'fullgrad': 'it collects bias gradients with 2D-only code',
    'shapleycam': 'it needs Hessian-vector products (create_graph), a second backward per tile',
    'finercam': 'it is a classification method that compares logits of similar classes',
}
ALIASES = {'gradcampp': 'gradcam++', 'gradcamplusplus': 'gradcam++', 'seg-xres-cam': 'segxrescam',
           'kpca-cam': 'kpcacam', 'kpca_cam': 'kpcacam', 'segxres': 'segxrescam'}


def available_methods() -> Dict[str, str]:
    """name -> one-line description, for --list-methods."""
    rows = {name: (f'native, pooled (--pooling tile|volume, default {cls.default_pooling})' if cls.pooled
                   else 'native, element-wise') for name, cls in NATIVE.items()}
    rows['segxrescam'] += '; --pool-size/--pool-mode'
    rows.update({name: f'pytorch-grad-cam {spec["cls_name"]} via adapter (CPU, per tile)' for name, spec in ADAPTED.items()})
    rows.update({name: f'unavailable: {why}' for name, why in UNAVAILABLE.items()})
    return rows


def get_method(name: str, pool_size: Optional[int] = None, pool_mode: str = 'max') -> CamMethod:
    key = ALIASES.get(name.lower(), name.lower())
    if pool_size is not None and key != 'segxrescam':
        raise UsageError(f'--pool-size only applies to segxrescam, not {name}; drop --pool-size or use '
                         f'--method segxrescam')
    if key == 'segxrescam':
        if pool_mode not in ('max', 'mean'):
            raise UsageError(f'--pool-mode must be max or mean, not {pool_mode!r}')
        return SegXResCAM(pool_size or 2, pool_mode)
    if key in NATIVE:
        return NATIVE[key]()
    if key in ADAPTED:
        return GradCamLibraryMethod(key, **ADAPTED[key])
    if key in UNAVAILABLE:
        raise UsageError(f'method {name!r} is not available for 2D/3D segmentation: {UNAVAILABLE[key]}; '
                         f'use gradcam, hirescam or another from --list-methods')
    raise UsageError(f'unknown method {name!r}; choose one of: {", ".join(list(NATIVE) + list(ADAPTED))}')
