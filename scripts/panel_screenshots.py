"""The NNUNetCAM panel rendered offscreen on the real-Qt harness (Testing/slicer_standin.py) with the tiny demo model:
idle with the model loaded, and running (progress bar, Cancel).

    PYTHONPATH=. python scripts/panel_screenshots.py -o Resources/Screenshots
"""
import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / 'Testing'), str(ROOT / 'NNUNetCAM')]


class _Patch:
    """What slicer_standin.install needs of pytest's monkeypatch: set for the life of this script."""

    def setitem(self, mapping, key, value):
        mapping[key] = value

    def delitem(self, mapping, key, raising=True):
        mapping.pop(key, None)

    def setattr(self, obj, name, value, raising=True):
        setattr(obj, name, value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-o', '--output', type=Path, default=ROOT / 'Resources' / 'Screenshots')
    args = parser.parse_args(argv)
    import slicer
    import slicer_standin
    from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder, write_sample_case
    model = model_folder(build_tiny_models(default_cache()))
    work = Path(tempfile.mkdtemp(prefix='panel-shots-'))
    (work / 'tmp').mkdir()
    scene = slicer.vtkMRMLScene()
    app = slicer_standin.install(_Patch(), scene, str(work / 'tmp'), 'main')
    spec = importlib.util.spec_from_file_location('NNUNetCAM', ROOT / 'NNUNetCAM' / 'NNUNetCAM.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    slicer.util.loadVolume(write_sample_case(work))
    widget = slicer_standin.openPanel(module, (460, 1000))
    parent, ui = widget.parent, widget.ui
    ui.modelFolderPathLineEdit.currentPath = str(model)
    app.runPending()
    node = widget._parameterNode
    node.device, node.tta, node.targetClass, node.computeOn = 'cpu', False, 'lesion', module.ComputeOn.process
    args.output.mkdir(parents=True, exist_ok=True)
    parent.grab().save(str(args.output / 'panel_idle.png'))
    ui.applyButton.click()
    slicer_standin.waitFor(lambda: ui.progressBar.value >= 20, 300)
    parent.grab().save(str(args.output / 'panel_running.png'))
    ui.applyButton.click()  # Cancel
    time.sleep(0.5)
    widget.cleanup()
    print(args.output / 'panel_idle.png', args.output / 'panel_running.png')


if __name__ == '__main__':
    main()
