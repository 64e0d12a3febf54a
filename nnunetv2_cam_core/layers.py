"""Target layers: names, defaults, listing, and capturing their outputs during the forward pass."""
import difflib
import logging
from typing import Dict, List, Optional, Sequence

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from torch import nn

from .errors import UsageError


def bottleneck(network: nn.Module) -> str:
    """The last encoder stage."""
    return f'encoder.stages.{len(network.encoder.stages) - 1}'


def decoder_stages(network: nn.Module) -> List[str]:
    """Decoder stages, lowest resolution first (decoder.stages.0)."""
    return [f'decoder.stages.{i}' for i in range(len(network.decoder.stages))]


def default_layer(network: nn.Module) -> str:
    """The last decoder stage: on 2D and 3D models and cases unlike the training data its maps beat the
    bottleneck's against random deletion and insertion, barely change with the tiling, and equal the untiled map
    (benchmarks/defaults.py; README "Which layer and method by default")."""
    return decoder_stages(network)[-1]


def resolve_layers(network: nn.Module, names: Sequence[str]) -> List[str]:
    modules = dict(network.named_modules())
    if not names:
        return [default_layer(network)]
    out = []
    for name in names:
        name = name.removeprefix('_orig_mod.')  # as a compiled network names it
        key = {'bottleneck': bottleneck(network), 'last_decoder': decoder_stages(network)[-1]}.get(name, name)
        if key not in modules or not key:
            close = difflib.get_close_matches(key, [m for m in modules if m], n=5, cutoff=0.5)
            raise UsageError(f'unknown target layer {name!r}; closest: {", ".join(close) or "none"} '
                             f'(run --list-layers -m MODEL to see all)')
        out.append(key)
    return out


# nnU-Net's U-Nets: forward is decoder(encoder(x)), and the decoder applies seg_layers[-1] to its last stage's output
# and returns it (no deep supervision)
EXACT_NETWORKS = (PlainConvUNet, ResidualEncoderUNet, ResidualUNet)
EXACT_DECODERS = (UNetDecoder, UNetResDecoder)


def head_of(network: nn.Module, names: Sequence[str]) -> Optional[nn.Module]:
    """The module that makes the network's output from the one target layer's, where that is all that follows it:
    the segmentation convolution after the last decoder stage of one of nnU-Net's own U-Nets (exact classes, so no
    overridden forward in between), without deep supervision. None otherwise (no replay)."""
    dec = getattr(network, 'decoder', None)
    if len(names) != 1 or type(network) not in EXACT_NETWORKS or type(dec) not in EXACT_DECODERS \
            or dec.deep_supervision or names[0] != decoder_stages(network)[-1]:
        return None
    head = dec.seg_layers[-1]
    return head if type(head) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else None


log = logging.getLogger(__name__)


class LayerCache:
    """A case's target-layer outputs, per tile and forward (fold x mirror), kept by one run for the next ones at
    that layer (the server's): where only the segmentation layer follows it (`head_of`), another class or method
    needs no forward pass, as the logits and the gradients come from the kept output and that layer alone. Holds
    at most `budget_bytes`; tiles beyond it run as usual. The first forward each fold keeps is checked: the head
    replayed on the kept output must give the network's output, or the cache turns itself off (`off`)."""

    def __init__(self, layer: str, budget_bytes: int):
        self.layer, self.budget, self.nbytes = layer, budget_bytes, 0
        self.outputs: Dict[tuple, torch.Tensor] = {}
        self.block: Optional[torch.Tensor] = None
        self.checked: set = set()  # folds whose replay matched a real forward
        self.off: Optional[str] = None  # why the cache is off

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        return None if self.off else self.outputs.get(key)

    def check(self, fold: int, head: nn.Module, output: torch.Tensor, network_output: torch.Tensor) -> bool:
        """Once per fold: does the head alone, on the layer's output, give the network's output? If not, the cache
        is emptied and off, with a log line."""
        if self.off or fold in self.checked:
            return not self.off
        with torch.no_grad():
            replay = head(output.detach()).float()
        real = network_output.detach().float()
        # the same operations on the same values: equal up to float rounding (float16 under autocast)
        tol = (1e-2 if real.dtype == torch.float16 or output.dtype == torch.float16 else 1e-4) * \
            max(float(real.abs().max()), 1.0)
        if replay.shape == real.shape and float((replay - real).abs().max()) <= tol:
            self.checked.add(fold)
            return True
        diff = float((replay - real).abs().max()) if replay.shape == real.shape else float('inf')
        self.off = (f'the segmentation layer replayed on {self.layer}\'s output differs from the network\'s output '
                    f'(fold {fold}, by up to {diff:.3g}): something after that layer changes the output; the layer '
                    f'cache is off and every tile runs its forwards')
        log.warning(self.off)
        self.outputs, self.block, self.nbytes = {}, None, 0
        return False

    def keep(self, key: tuple, output: torch.Tensor) -> None:
        n = -(-output.nelement() * output.element_size() // 64) * 64
        if self.off or key in self.outputs or self.nbytes + n > self.budget:
            return
        if self.block is None:  # one allocation: outputs kept one by one would strand freed memory between them
            self.block = torch.empty(self.budget, dtype=torch.uint8)
        part = self.block[self.nbytes:self.nbytes + output.nelement() * output.element_size()]
        self.outputs[key] = part.view(output.dtype).view(output.shape).copy_(output.detach())
        self.nbytes += n


class LayerCapture:
    """Forward hooks on the target layers. The first one to run is cut from the graph and made a leaf, so the
    backward stops there: no gradients for the encoder below it and none for parameters. Captured outputs are kept
    as the layer returned them."""

    def __init__(self, network: nn.Module, names: Sequence[str], cut: bool = True):
        self.outputs: Dict[str, torch.Tensor] = {}
        self.cut = cut  # False: the graph goes on to the network input
        modules = dict(network.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.cut and not self.outputs:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            # the network goes on with a copy: a block that adds its residual in place (ResEnc's `out += residual`
            # after conv2) must not change what was captured
            return output.clone()
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def list_layers(network: nn.Module, patch_size: Sequence[int], in_channels: int, device: torch.device) -> List[dict]:
    """Every module with its type, output shape for one tile and stride, from one dry forward."""
    shapes: Dict[str, tuple] = {}
    named = [(n, m) for n, m in network.named_modules() if n]

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))
        return hook
    handles = [m.register_forward_hook(record(n)) for n, m in named]
    try:
        with torch.no_grad():
            network(torch.zeros((1, in_channels, *patch_size), device=device))
    finally:
        for h in handles:
            h.remove()
    marks = {bottleneck(network): 'bottleneck'}
    marks.update({n: f'decoder stage {i}' for i, n in enumerate(decoder_stages(network))})
    marks[default_layer(network)] += ' (default)'
    rows = []
    for name, module in named:
        shape = shapes.get(name)
        stride = None if shape is None else [round(p / s, 3) for p, s in zip(patch_size, shape[2:])]
        rows.append({'name': name, 'type': type(module).__name__, 'shape': None if shape is None else list(shape[1:]),
                     'stride': stride, 'mark': marks.get(name, 'unused at inference' if shape is None and not any(module.children()) else '')})
    return rows
