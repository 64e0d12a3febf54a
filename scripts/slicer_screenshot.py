"""The README's Slicer screenshot, rendered offscreen with Slicer's own slice logic (`slicer-core`): the tiny demo
model is run through NNUNetCAMLib exactly as the panel runs it, and the Red slice view's blend of the scan (background)
and the CAM (foreground, thresholded, 50 % opacity) is written as a PNG, one panel per class.

    python scripts/slicer_screenshot.py -o Resources/Screenshots/slice_overlay.png
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'NNUNetCAM'))


def render_slice(scene, background, foreground, offset_ras, size=(360, 360)) -> np.ndarray:
    """RGBA (rows, cols, 4) of an axial slice view through `offset_ras`, as Slicer blends it."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy
    app = slicer.vtkMRMLApplicationLogic()
    app.SetMRMLScene(scene)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app)
    logic.AddSliceNode(f'Screenshot{scene.GetNumberOfNodes()}')
    composite = logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetForegroundVolumeID(foreground.GetID())
    composite.SetForegroundOpacity(0.5)
    logic.GetSliceNode().SetDimensions(size[0], size[1], 1)
    logic.FitSliceToBackground(*size)
    logic.SetSliceOffset(offset_ras[2])
    logic.UpdateImageData()
    port = logic.GetImageDataConnection()
    port.GetProducer().Update()
    image = port.GetProducer().GetOutputDataObject(port.GetIndex())
    w, h, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1]


def inferno_like(scene, display_node):
    """The bare scene lacks Slicer's file-based color tables; rebuild Inferno from matplotlib for the picture."""
    import slicer
    from matplotlib import colormaps
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for i, rgba in enumerate(colormaps['inferno'](np.linspace(0, 1, 256))):
        table.SetColor(i, *rgba)
    scene.AddNode(table)
    display_node.SetAndObserveColorNodeID(table.GetID())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('-o', '--output', type=Path, default=ROOT / 'Resources' / 'Screenshots' / 'slice_overlay.png')
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import slicer
    from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder, write_sample_case
    from NNUNetCAMLib import DisplayOptions, NNUNetCAMLogic
    from NNUNetCAMLib.volumes import ijk_to_ras

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    with tempfile.TemporaryDirectory() as tmp:
        case = write_sample_case(Path(tmp))
        volume = scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', 'sample')
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(case))
        storage.ReadData(volume)
        result = NNUNetCAMLogic(scene, temp_root=tmp).run(
            volume, model_folder(build_tiny_models(default_cache())), targetClass=['lesion', 'organ'],
            layers=['last_decoder'], device='cpu', displayOptions=DisplayOptions('Rainbow', threshold=0.15))
    display = volume.GetDisplayNode() or scene.AddNewNodeByClass('vtkMRMLScalarVolumeDisplayNode')
    volume.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAndObserveColorNodeID('vtkMRMLColorTableNodeGrey')
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 400)
    fig, axes = plt.subplots(1, len(result.cams), figsize=(4.2 * len(result.cams) + 0.6, 4.4), dpi=110,
                             constrained_layout=True)
    for ax, (label, cam) in zip(np.atleast_1d(axes), result.cams.items()):
        inferno_like(scene, cam.GetDisplayNode())
        values = slicer.util.arrayFromVolume(cam)
        k = int(np.argmax(values.reshape(values.shape[0], -1).max(1)))  # the slice where this CAM peaks
        centre = ijk_to_ras(volume) @ np.array([*(np.array(values.shape[:0:-1]) / 2), k, 1])
        ax.imshow(render_slice(scene, volume, cam, centre[:3])[..., :3])
        ax.set_title(f'{cam.GetName()}\n(Red slice view, threshold 0.15, opacity 0.5)', fontsize=9)
        ax.axis('off')
    mappable = plt.cm.ScalarMappable(cmap='inferno', norm=matplotlib.colors.Normalize(0, 1))
    fig.colorbar(mappable, ax=np.atleast_1d(axes).tolist(), shrink=0.7, label='CAM (weak to strong)')
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(args.output)
    return 0


if __name__ == '__main__':
    sys.exit(main())
