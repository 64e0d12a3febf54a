"""How far float16 autocast (what nnU-Net, and so NNUNetCAM, runs on CUDA) moves the gradients a map is made of,
layer by layer: the CT benchmark's network (gpu_ct.py: 6 stages, 32-320 features, random weights) on one 64^3
tile, class 1 over the whole tile, gradients at the bottleneck and each decoder stage under float16 autocast
against float32. Also with the upstream scaled by 2^10 (loss scaling: helps only if gradients underflow).

Runs on the CPU (its float16 autocast; slow: about 12 min on 2 cores) or, with --device cuda, on a GPU:

    python benchmarks/autocast_precision.py [--device cuda]     # writes results/autocast_precision_DEVICE.json
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_ct import build_case, build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    args = ap.parse_args(argv)
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.layers import bottleneck, decoder_stages
    from nnunetv2_cam_core.model import load_predictor
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / 'Dataset988_CTBench' / 'nnUNetTrainer__nnUNetPlans__3d_fullres', 64,
                            folds=(0,))
        pred = load_predictor(model, [0], 'checkpoint_final.pth', device, use_mirroring=False)
        data, _, _, _ = CamEngine(pred).preprocess([str(build_case(Path(tmp) / 'case', 64))])
    net = pred.network
    layers = [bottleneck(net)] + decoder_stages(net)
    modules = dict(net.named_modules())
    acts = {}
    for name in layers:
        modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))
    x = data[None].to(device)

    def gradients(dtype, scale):
        with torch.autocast(device.type, dtype=torch.float16, enabled=dtype == 'float16'):
            out = net(x)
        up = torch.zeros_like(out)
        up[:, 1] = scale
        g = torch.autograd.grad(out, [acts[n] for n in layers], grad_outputs=up)
        return {n: gi.float() / scale for n, gi in zip(layers, g)}

    ref = gradients('float32', 1.0)
    rows = {n: {'shape': list(ref[n].shape[1:]), 'float32_abs_max': float(ref[n].abs().max()),
                'float32_abs_median': float(ref[n].abs().median())} for n in layers}
    for scale in (1.0, 2.0 ** 10):
        g = gradients('float16', scale)
        for n in layers:
            rows[n][f'float16_max_error_over_peak_upstream_x{int(scale)}'] = \
                float((g[n] - ref[n]).abs().max() / ref[n].abs().max())
            rows[n][f'float16_finite_upstream_x{int(scale)}'] = bool(torch.isfinite(g[n]).all())
    out = Path(__file__).parent / 'results' / f'autocast_precision_{device.type}.json'
    out.write_text(json.dumps({'device': str(device), 'torch': torch.__version__, 'layers': rows}, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
