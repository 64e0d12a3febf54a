"""How a CAM looks: colormap, window [0, 1], a lower threshold that hides weak activation, the overlay in every
slice view, a color legend and optional volume rendering. MRML only, so it runs (and is tested) without the app."""
from typing import Tuple

import numpy as np

import slicer

# name shown in the panel -> Slicer's color node ID (the file-based ones exist in the app, not in a bare scene)
COLORMAPS = {
    'Inferno': 'vtkMRMLColorTableNodeFileInferno.txt',
    'Viridis': 'vtkMRMLColorTableNodeFileViridis.txt',
    'ColdToHotRainbow': 'vtkMRMLColorTableNodeFileColdToHotRainbow.txt',
    'Rainbow': 'vtkMRMLColorTableNodeRainbow',
    'Iron': 'vtkMRMLColorTableNodeIron',
    'PET-Heat': 'vtkMRMLPETProceduralColorNodePET-Heat',
}
DEFAULT_COLORMAP = 'Inferno'
FALLBACK_COLORMAP = 'Rainbow'


def color_node_id(scene, name: str) -> Tuple[str, str]:
    """(node ID, note): the chosen colormap, or the built-in fallback with a note when the scene lacks it."""
    if name not in COLORMAPS:
        raise ValueError(f'unknown colormap {name!r}; choose one of {", ".join(COLORMAPS)}')
    if scene.GetNodeByID(COLORMAPS[name]) is not None:
        return COLORMAPS[name], ''
    return COLORMAPS[FALLBACK_COLORMAP], f'colormap {name} is not loaded in this scene; used {FALLBACK_COLORMAP}'


def style_cam(scene, cam_node, colormap: str = DEFAULT_COLORMAP, threshold: float = 0.2) -> str:
    """Colormap over the CAM's [0, 1] range; voxels below `threshold` are transparent in the slice views."""
    display = cam_node.GetDisplayNode()
    if display is None:
        display = scene.AddNewNodeByClass('vtkMRMLScalarVolumeDisplayNode')
        cam_node.SetAndObserveDisplayNodeID(display.GetID())
    color_id, note = color_node_id(scene, colormap)
    display.SetAndObserveColorNodeID(color_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(threshold)
    display.SetUpperThreshold(1.0e6)
    display.SetInterpolate(True)
    return note


def show_in_slice_views(scene, background, foreground, opacity: float = 0.5) -> None:
    """The input behind, the CAM in front, in every slice view of the scene."""
    for i in range(scene.GetNumberOfNodesByClass('vtkMRMLSliceCompositeNode')):
        composite = scene.GetNthNodeByClass(i, 'vtkMRMLSliceCompositeNode')
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID())
        composite.SetForegroundOpacity(opacity)


def set_overlay_opacity(scene, opacity: float) -> None:
    for i in range(scene.GetNumberOfNodesByClass('vtkMRMLSliceCompositeNode')):
        scene.GetNthNodeByClass(i, 'vtkMRMLSliceCompositeNode').SetForegroundOpacity(opacity)


def add_color_legend(cam_node, title: str):
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(cam_node)
    legend.SetTitleText(title)
    legend.SetLabelFormat('%.1f')
    return legend


def show_volume_rendering(scene, cam_node, volume_rendering_logic, threshold: float = 0.2):
    """3D rendering with the CAM's colormap; transparent below `threshold`, more opaque towards 1."""
    display = volume_rendering_logic.CreateDefaultVolumeRenderingNodes(cam_node)
    to_colors = scene.GetNodeByID(cam_node.GetDisplayNode().GetColorNodeID()).GetScalarsToColors()
    prop = display.GetVolumePropertyNode().GetVolumeProperty()
    colors = prop.GetRGBTransferFunction()
    colors.RemoveAllPoints()
    lo, hi = to_colors.GetRange()
    rgb = [0.0, 0.0, 0.0]
    for x in np.linspace(0, 1, 11):
        to_colors.GetColor(lo + x * (hi - lo), rgb)
        colors.AddRGBPoint(x, *rgb)
    opacity = prop.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(max(threshold, 1e-3), 0.0)
    opacity.AddPoint(1.0, 0.6)
    display.SetVisibility(True)
    return display
