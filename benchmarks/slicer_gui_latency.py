"""How long the Slicer panel holds the GUI thread on a 512x512x300 CT, on the real-Qt harness (Testing/slicer_standin.py):

    PYTHONPATH=. python benchmarks/slicer_gui_latency.py    # into benchmarks/results/slicer/gui_latency.json

A 10 ms Qt timer ticks throughout; the longest gap between two ticks is the longest time the GUI thread processed no
events. Three Applies on this computer's server (tiny 3d_fullres model, fold 0, no TTA, CPU), each followed until the
sliding window starts and then cancelled: the first (server start; the case hashed, written and sent), the second on
the same volume (the case already on the server: nothing written or sent), a third with a point target ("explain
here": the ball drawn inside its box). For each: the click's own time, the longest gap, and the Cancel click's time.
Then the GUI-thread pieces alone: writing the case (what a held case saves), the point's target mask, and the hash
(which runs on the run's own thread). Goal: no gap over 100 ms, Cancel within 2 s.
"""
import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / 'Testing'), str(ROOT / 'NNUNetCAM')]

import slicer  # noqa: E402
import vtk  # noqa: E402
import slicer_standin  # noqa: E402
from PyQt5 import QtCore  # noqa: E402
from PyQt5.QtCore import Qt  # noqa: E402
from PyQt5.QtTest import QTest  # noqa: E402

from NNUNetCAMLib import volumes  # noqa: E402
from nnunetv2_cam_core.demo import build_tiny_models, default_cache, model_folder  # noqa: E402

SHAPE = (300, 512, 512)  # K, J, I: a CT


class Gaps:
    """The longest time between two ticks of a 10 ms timer on the GUI thread."""

    def __init__(self):
        self.timer = QtCore.QTimer()
        self.timer.timeout.connect(self.tick)
        self.timer.start(10)
        self.reset()

    def tick(self):
        now = time.perf_counter()
        self.worst, self.last = max(self.worst, now - self.last), now

    def reset(self):
        self.last, self.worst = time.perf_counter(), 0.0


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 3)


def scene_with_ct(shape):
    scene = slicer_standin.appScene()
    rng = np.random.default_rng(0)
    voxels = rng.normal(0, 20, shape).astype(np.int16)
    k, j, i = (n // 2 for n in shape)
    voxels[k - 10:k + 10, j - 15:j + 15, i - 15:i + 15] += 400  # something for the model to find
    node = scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', 'CT')
    image = vtk.vtkImageData()
    image.SetDimensions(shape[::-1])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.8, 1.5)
    slicer.util.arrayFromVolume(node)[:] = voxels
    slicer.util.arrayFromVolumeModified(node)
    return scene, node


def apply_until_tiles(app, ui, gaps, seconds: float) -> dict:
    gaps.reset()
    click = timed(lambda: QTest.mouseClick(ui.applyButton, Qt.LeftButton))
    started = slicer_standin.waitFor(lambda: 'tile' in ui.statusLabel.text or not ui.progressBar.visible, seconds)
    status = ui.statusLabel.text
    longest = gaps.worst
    cancel = timed(lambda: QTest.mouseClick(ui.applyButton, Qt.LeftButton)) if 'tile' in status else None
    return {'click_s': click, 'longest_gap_s': round(longest, 3), 'cancel_s': cancel,
            'reached_tiles': bool(started and 'tile' in status), 'status': status.splitlines()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'slicer' / 'gui_latency.json')
    ap.add_argument('--shape', type=int, nargs=3, default=SHAPE, metavar=('K', 'J', 'I'),
                    help='the volume\'s size (slices, rows, columns); smaller ones check the script, not the goal')
    ap.add_argument('--wait-s', type=float, default=900, help='how long to wait for each run\'s tiles to start')
    args = ap.parse_args(argv)
    model = model_folder(build_tiny_models(default_cache()))
    scene, ct = scene_with_ct(tuple(args.shape))
    out = {'volume': args.shape[::-1], 'model': 'tiny 3d_fullres, fold 0, no TTA, cpu'}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        temporary = Path(tmp) / 'tmp'
        temporary.mkdir()
        app = slicer_standin.install(monkeypatch, scene, str(temporary), 'main')
        spec = importlib.util.spec_from_file_location('NNUNetCAM', ROOT / 'NNUNetCAM' / 'NNUNetCAM.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        widget = slicer_standin.openPanel(module)
        ui, node = widget.ui, widget._parameterNode
        ui.modelFolderPathLineEdit.currentPath = str(model)
        app.runPending()
        node.inputVolume, node.device, node.tta, node.targetClass = ct, 'cpu', False, 'lesion'
        for box in widget._foldBoxes[1:]:
            box.checked = False
        gaps = Gaps()
        try:
            out['first_apply'] = apply_until_tiles(app, ui, gaps, args.wait_s)
            out['second_apply_same_volume'] = apply_until_tiles(app, ui, gaps, args.wait_s)
            point = scene.AddNewNodeByClass('vtkMRMLMarkupsFiducialNode', 'here')
            point.AddControlPoint(*(volumes.ijk_to_ras(ct) @ [*[n // 2 for n in args.shape[::-1]], 1])[:3])
            node.targetPoint = point
            out['point_apply'] = apply_until_tiles(app, ui, gaps, args.wait_s)
        finally:
            widget.cleanup()
        pieces = Path(tmp) / 'pieces'
        pieces.mkdir()
        out['gui_thread_pieces_s'] = {
            'write the case (saved when the server holds it)':
                timed(lambda: volumes.write_case(pieces, [ct], '.nii.gz', 'ct')),
            'point target mask, 10 mm': timed(lambda: volumes.write_target_mask(
                scene, ct, pieces / 'mask.nii.gz', point=point, radius_mm=10)),
        }
        out['run_thread_pieces_s'] = {'hash voxels and geometry':
                                      timed(lambda: volumes.CaseContent([ct], '.nii.gz').key())}
        out['slot_errors'] = [str(e) for e in app.slotErrors]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + '\n')
    print(json.dumps(out, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
