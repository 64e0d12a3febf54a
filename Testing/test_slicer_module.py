"""The Slicer module's logic (NNUNetCAMLib) against real MRML from the `slicer-core` wheel and the real core
subprocess on the tiny model; the panel and self-test of NNUNetCAM.py in stand-ins for the Slicer app
(slicer_standin.py); static checks of the module's files (.ui names, CMake lists, catalog entry)."""
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
import unittest
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip('slicer')  # slicer-core: in requirements.txt, so CI has it
import vtk  # noqa: E402  (slicer-core's own vtk)

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / 'NNUNetCAM'
sys.path.insert(0, str(MODULE))

from NNUNetCAMLib import (DisplayOptions, NNUNetCAMLogic, PythonEnvironment, install_requirements,  # noqa: E402
                          layer_choices, missing_requirements, torch_install_arguments)
from NNUNetCAMLib import display, volumes  # noqa: E402
from NNUNetCAMLib.logic import STAGES, stdout_json  # noqa: E402

sys.path.insert(0, str(ROOT / 'scripts'))
from slicer_screenshot import render_slice  # noqa: E402

import slicer_standin  # noqa: E402

STAGE_TILES = STAGES['tiles'][0]  # where the sliding window starts on the progress bar


@pytest.fixture(scope='session', autouse=True)
def segmentation_converters():
    """What Slicer's Segmentations module registers at startup."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())


@pytest.fixture
def scene():
    """A scene as the app has it."""
    return slicer_standin.appScene()


def load_volume(scene, path, name='input'):
    node = scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def volume_from_array(scene, arr, ijk_to_ras, name, label=False):
    node = scene.AddNewNodeByClass('vtkMRMLLabelMapVolumeNode' if label else 'vtkMRMLScalarVolumeNode', name)
    image = vtk.vtkImageData()
    image.SetDimensions(arr.shape[::-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR if label else vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(volumes._matrix(ijk_to_ras))
    slicer.util.arrayFromVolume(node)[:] = arr
    return node


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def oblique_ijk_to_ras():
    """Not the identity: anisotropic spacing, a rotation about two axes, an offset."""
    a, b = np.deg2rad(20), np.deg2rad(-12)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([0.95, 0.95, 2.1])
    m[:3, 3] = (-12.5, 30.25, 7.0)
    return m


@pytest.fixture
def input_volume(scene, sample_case):
    """The sample scan with a non-identity IJK-to-RAS, under a parent transform (as after registration)."""
    node = load_volume(scene, sample_case, 'Patient CT')
    node.SetIJKToRASMatrix(volumes._matrix(oblique_ijk_to_ras()))
    transform = scene.AddNewNodeByClass('vtkMRMLLinearTransformNode', 'registration')
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def test_run_loads_cam_and_segmentation_on_the_input_grid(scene, input_volume, model3d, tmp_path):
    before = {'matrix': volumes.ijk_to_ras(input_volume), 'voxels': slicer.util.arrayFromVolume(input_volume).copy(),
              'storage': input_volume.GetStorageNodeID(), 'nodes': node_ids(scene)}
    temp_root = tmp_path / 'tmp'
    temp_root.mkdir()
    vr = slicer.vtkSlicerVolumeRenderingLogic()
    vr.SetMRMLScene(scene)
    pumped = []
    logic = NNUNetCAMLogic(scene, temp_root=str(temp_root), volume_rendering_logic=vr,
                           event_pump=lambda: pumped.append(time.monotonic()))
    progress = []
    result = logic.run(input_volume, model3d, targetClass=['lesion', 'organ'], layers=['last_decoder'], folds=[0],
                       device='cpu', tta=False, outputFolder=str(tmp_path / 'kept'),
                       displayOptions=DisplayOptions('Rainbow', threshold=0.3, opacity=0.7, volume_rendering=True),
                       onProgress=lambda f, text: progress.append((f, text)))

    # nodes, named from dataset.json and the input
    assert set(result.cams) == {'lesion', 'organ'}
    cam = result.cams['lesion']
    assert cam.GetName() == 'Patient CT CAM lesion gradcam'
    seg = result.segmentation.GetSegmentation()
    assert sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())) == ['lesion', 'organ']
    # geometry: exactly the input's IJK-to-RAS and parent transform
    for node in result.cams.values():
        assert np.abs(volumes.ijk_to_ras(node) - volumes.ijk_to_ras(input_volume)).max() < 1e-4
        assert node.GetTransformNodeID() == input_volume.GetTransformNodeID()
        assert node.GetImageData().GetDimensions() == input_volume.GetImageData().GetDimensions()
    assert result.segmentation.GetTransformNodeID() == input_volume.GetTransformNodeID()
    # voxel values: those of the core's files
    sidecar = json.loads((tmp_path / 'kept' / 'Patient_CT_cam.json').read_text())
    for label, node in result.cams.items():
        on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'kept' / sidecar['cams'][label])))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), on_disk)
        assert on_disk.max() == pytest.approx(1.0)
    seg_on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'kept' / sidecar['segmentation'])))
    lesion_id = next(seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())
                     if seg.GetNthSegment(i).GetName() == 'lesion')
    segmentation_logic = slicer.vtkSlicerSegmentationsModuleLogic
    labelmap = scene.AddNewNodeByClass('vtkMRMLLabelMapVolumeNode')
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(lesion_id)
    assert segmentation_logic.ExportSegmentsToLabelmapNode(result.segmentation, ids, labelmap, input_volume)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap) > 0, seg_on_disk == 1)
    scene.RemoveNode(labelmap)
    # display: the chosen colormap, window [0, 1], threshold; overlay in every slice view; legend; 3D rendering
    d = cam.GetDisplayNode()
    assert d.GetColorNodeID() == display.COLORMAPS['Rainbow']
    assert (d.GetWindow(), d.GetLevel()) == pytest.approx((1.0, 0.5))
    assert d.GetApplyThreshold() and d.GetLowerThreshold() == pytest.approx(0.3)
    for i in range(scene.GetNumberOfNodesByClass('vtkMRMLSliceCompositeNode')):
        composite = scene.GetNthNodeByClass(i, 'vtkMRMLSliceCompositeNode')
        assert composite.GetBackgroundVolumeID() == input_volume.GetID()
        assert composite.GetForegroundVolumeID() == cam.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(cam) is not None
    assert vr.GetFirstVolumeRenderingDisplayNode(cam).GetVisibility()
    # as Slicer's slice logic blends it: colour over the lesion, plain grey where the CAM is under the threshold
    values = slicer.util.arrayFromVolume(cam)
    peak = np.unravel_index(np.argmax(values), values.shape)  # the axial plane through it (the volume is oblique)
    centre = volumes.ijk_to_ras(input_volume) @ np.array([*peak[::-1], 1])
    rgb = render_slice(scene, input_volume, cam, centre[:3])[..., :3].astype(int)
    coloured = np.abs(rgb[..., 0] - rgb[..., 2]) > 10
    assert 0.001 < coloured.mean() < 0.2, coloured.mean()
    # the nodes save like any Slicer node: default storage nodes write them, and they read back the same
    for node in result.nodes():
        assert node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(tmp_path / f'saved_{node.GetID()}.{storage.GetDefaultWriteFileExtension().lstrip(".")}'))
        assert storage.WriteData(node), node.GetName()
    saved = load_volume(scene, cam.GetStorageNode().GetFileName(), 'reloaded')
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(saved), slicer.util.arrayFromVolume(cam))
    scene.RemoveNode(saved)
    # the blocking run processed events all along (in Slicer: slicer.app.processEvents)
    assert len(pumped) > 10
    # progress went forward to the end; the input is untouched; the temporary folder is gone
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any('tile' in text for _, text in progress)
    np.testing.assert_array_equal(volumes.ijk_to_ras(input_volume), before['matrix'])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(input_volume), before['voxels'])
    assert input_volume.GetStorageNodeID() == before['storage']
    assert list(temp_root.iterdir()) == []
    added = [scene.GetNodeByID(i) for i in node_ids(scene) - before['nodes']]
    assert {n.GetID() for n in added if n.IsA('vtkMRMLVolumeNode')} == {n.GetID() for n in result.cams.values()}


def test_cancel_mid_run_kills_the_process_tree_and_adds_nothing(scene, input_volume, model3d, tmp_path):
    temp_root = tmp_path / 'tmp'
    temp_root.mkdir()
    logic = NNUNetCAMLogic(scene, temp_root=str(temp_root))
    nodes = node_ids(scene)
    run = logic.run(input_volume, model3d, targetClass='lesion', folds=[0, 1], device='cpu', wait=False)
    with pytest.raises(RuntimeError, match='already going'):
        logic.run(input_volume, model3d, wait=False)
    deadline = time.monotonic() + 120
    while run.poll() and run.fraction <= STAGE_TILES and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.running and run.fraction > STAGE_TILES, run.log[-5:]  # cancelled while tiles are computed
    pid = run.process.pid
    t0 = time.monotonic()
    run.cancel()
    assert time.monotonic() - t0 < 2.0
    assert run.state == 'cancelled' and not run.poll()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of its group is left
    assert list(temp_root.iterdir()) == []
    assert node_ids(scene) == nodes


def test_bad_model_folder_raises_the_cores_message(scene, input_volume, tmp_path):
    missing = tmp_path / 'no_such_model'
    cli = subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', '-i', str(tmp_path), '-o', str(tmp_path / 'o'),
                          '-m', str(missing)], capture_output=True, text=True)
    core_message = cli.stderr.strip().splitlines()[-1][len('error: '):]
    nodes = node_ids(scene)
    with pytest.raises(Exception) as e:
        NNUNetCAMLogic(scene, temp_root=str(tmp_path)).run(input_volume, missing)
    assert str(e.value) == core_message
    assert node_ids(scene) == nodes


def test_core_failure_reports_its_one_line_message_and_leaves_the_scene(scene, input_volume, model3d, tmp_path):
    broken = tmp_path / model3d.name
    shutil.copytree(model3d, broken)
    (broken / 'fold_0' / 'checkpoint_final.pth').write_bytes(b'not a checkpoint')
    temp_root = tmp_path / 'tmp'
    temp_root.mkdir()
    nodes = node_ids(scene)
    errors = []
    logic = NNUNetCAMLogic(scene, temp_root=str(temp_root))
    with pytest.raises(RuntimeError) as e:
        logic.run(input_volume, broken, folds=[0], device='cpu', onError=errors.append)
    assert str(e.value).startswith(f'could not load the model in {broken}')
    assert '\n' not in str(e.value) and errors == [str(e.value)]
    assert node_ids(scene) == nodes
    assert list(temp_root.iterdir()) == []


def test_scheduled_calls_advance_by_themselves(scene, input_volume, model3d, tmp_path):
    """The panel's mode: a scheduler (qt.QTimer.singleShot in Slicer, a plain queue here) polls the run and the
    short core calls; nothing blocks and the callbacks fire."""
    pending = []
    logic = NNUNetCAMLogic(scene, temp_root=str(tmp_path), scheduler=lambda ms, fn: pending.append(fn))
    answers, errors = [], []
    logic.callCore(['--list-methods', '--progress', 'json'], lambda rc, events: answers.append(stdout_json(rc, events)))
    broken = tmp_path / model3d.name
    shutil.copytree(model3d, broken)
    (broken / 'fold_0' / 'checkpoint_final.pth').write_bytes(b'not a checkpoint')
    run = logic.run(input_volume, broken, folds=[0], device='cpu', wait=False, onError=errors.append,
                    onFinished=lambda result: errors.append('finished?'))
    assert run.running and not answers
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        pending.pop(0)()
        time.sleep(0.02)
    assert not pending and 'gradcam' in answers[0]
    assert run.state == 'failed' and errors == [run.error] and 'could not load the model' in run.error


def test_channels_are_written_in_the_models_order(scene, tmp_path, model3d):
    m = oblique_ijk_to_ras()
    rng = np.random.default_rng(0)
    t1, t2 = (volume_from_array(scene, rng.normal(size=(6, 7, 8)).astype(np.float32), m, n) for n in ('T1', 'T2'))
    files = volumes.write_case(tmp_path, [t1, t2], '.nii.gz', 'case')
    assert [f.name for f in files] == ['case_0000.nii.gz', 'case_0001.nii.gz']
    for node, f in zip((t1, t2), files):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
                                      slicer.util.arrayFromVolume(node))
    # a two-channel model asks for a volume per channel, by name
    two = tmp_path / model3d.name
    shutil.copytree(model3d, two)
    dataset = json.loads((two / 'dataset.json').read_text())
    dataset['channel_names'] = {'0': 'T1', '1': 'T2'}
    (two / 'dataset.json').write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match='select a volume for T2'):
        NNUNetCAMLogic(scene, temp_root=str(tmp_path)).run(t1, two)


def test_target_masks_from_a_segment_and_an_roi(scene, tmp_path):
    m = oblique_ijk_to_ras()
    reference = volume_from_array(scene, np.zeros((10, 12, 14), np.float32), m, 'ref')
    box = np.zeros((10, 12, 14), np.uint8)
    box[2:5, 3:8, 4:10] = 1
    labelmap = volume_from_array(scene, box, m, 'box', label=True)
    segmentation = scene.AddNewNodeByClass('vtkMRMLSegmentationNode')
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    volumes.write_target_mask(scene, reference, tmp_path / 'seg.nii.gz', segmentation,
                              segmentation.GetSegmentation().GetNthSegmentID(0))
    mask = sitk.ReadImage(str(tmp_path / 'seg.nii.gz'))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), box)
    # an ROI around the voxel centres of the same box (in RAS, through the oblique matrix)
    centre_ijk = np.array([(4 + 9) / 2, (3 + 7) / 2, (2 + 4) / 2, 1])
    roi = scene.AddNewNodeByClass('vtkMRMLMarkupsROINode')
    roi.SetCenterWorld(*(m @ centre_ijk)[:3])
    axes = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    roi_to_world = vtk.vtkMatrix4x4()
    for i in range(3):
        for j in range(3):
            roi_to_world.SetElement(i, j, axes[i, j])
    roi.SetAndObserveObjectToNodeMatrix(roi_to_world)
    roi.SetCenterWorld(*(m @ centre_ijk)[:3])
    roi.SetSize(*(np.array([6, 5, 3]) * np.linalg.norm(m[:3, :3], axis=0)))
    np.testing.assert_array_equal(volumes.roi_mask(reference, roi), box > 0)
    nodes = node_ids(scene)
    far = scene.AddNewNodeByClass('vtkMRMLMarkupsROINode')
    far.SetCenter(1000, 1000, 1000)
    far.SetSize(1, 1, 1)
    with pytest.raises(ValueError, match='does not overlap'):
        volumes.write_target_mask(scene, reference, tmp_path / 'far.nii.gz', roi=far)
    assert node_ids(scene) == nodes | {far.GetID()}


def test_layers_and_methods_from_the_core(scene, model3d):
    logic = NNUNetCAMLogic(scene)
    methods = logic.listMethods()
    assert 'gradcam' in methods and 'hirescam' in methods
    choices = layer_choices(logic.listLayers(model3d))
    assert choices[0][0] == 'decoder.stages.2' and '(default)' in choices[0][1]  # preselected
    assert 'bottleneck' in dict(choices)['encoder.stages.3']
    decoder = dict(choices)['decoder.stages.2']
    assert 'decoder stage 2' in decoder and 'full resolution' in decoder
    assert '1/4 resolution' in dict(choices)['decoder.stages.0']
    with pytest.raises(RuntimeError, match='does not exist'):
        logic.listLayers('/no/such/model')


def test_python_environments_are_checked(tmp_path):
    pumped = []
    ok = PythonEnvironment(sys.executable).check(event_pump=lambda: pumped.append(1))
    assert ok['ok'] and ok['versions']['nnunetv2'] and 'cpu' in ok['devices'], ok
    assert pumped, 'check-env waited without processing events'
    assert ok['message'].startswith(sys.executable)
    bare = tmp_path / 'bare'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(bare)], check=True)
    no_torch = PythonEnvironment(str(bare / 'bin' / 'python'), base_env=dict(os.environ)).check()
    assert not no_torch['ok'] and 'is not installed in' in no_torch['message'], no_torch
    gone = PythonEnvironment(str(tmp_path / 'nope' / 'python')).check()
    assert not gone['ok'] and 'does not exist' in gone['message']


def test_requirements_install_never_replaces_what_slicer_ships(tmp_path):
    reqs = tmp_path / 'requirements.txt'
    reqs.write_text('# comment\nnumpy>=1.0\nnnunetv2>=2.5\nnot-a-real-package-xyz>=1.0\ntorch<1.0\n'
                    'pywin32>=1 ; sys_platform == "win32"\n')
    missing = missing_requirements(reqs)
    assert missing == ['not-a-real-package-xyz>=1.0', 'torch<1.0']
    calls, torch_calls = [], []

    def pip(args):
        constraints = Path(args[args.index('-c') + 1]).read_text().split()
        calls.append((args[2:], constraints))
    install_requirements(missing, pip, install_torch=torch_calls.append, log=lambda s: None)
    assert torch_calls == [['torch<1.0']]
    (packages, constraints), = calls
    assert packages == ['not-a-real-package-xyz>=1.0']
    from importlib.metadata import version
    assert f'numpy=={version("numpy")}' in constraints and f'SimpleITK=={version("SimpleITK")}' in constraints
    assert f'torch=={version("torch")}' in constraints
    with pytest.raises(RuntimeError, match='Slicer ships'):
        install_requirements(['numpy<1'], pip, log=lambda s: None)
    assert torch_install_arguments(['torchvision>=0.16']) == {'torchVersionRequirement': None,
                                                              'torchvisionVersionRequirement': '>=0.16'}
    assert missing_requirements(MODULE / 'Resources' / 'requirements.txt') == []  # this venv has them all


def test_stdout_json_reports_the_core_error():
    events = [{'event': 'log', 'stream': 'stderr', 'message': 'noise'},
              {'event': 'error', 'message': 'model folder x does not exist; pass the folder ...'}]
    with pytest.raises(RuntimeError, match='^model folder x does not exist'):
        stdout_json(2, events)


def test_colormap_fallback_and_unknown(scene):
    assert display.color_node_id(scene, 'Rainbow') == (display.COLORMAPS['Rainbow'], '')
    node_id, note = display.color_node_id(scene, 'Inferno')  # a file-based table the bare scene lacks
    assert node_id == display.COLORMAPS['Rainbow'] and 'Inferno' in note
    with pytest.raises(ValueError, match='unknown colormap'):
        display.color_node_id(scene, 'Jet')


# --- NNUNetCAM.py in stand-ins for the Slicer app ---
def install_app(monkeypatch, scene, tmp_path, version):
    temporary = tmp_path / 'Jane Doe' / 'tmp'  # a space, as in Windows user folders
    temporary.mkdir(parents=True)
    return slicer_standin.install(monkeypatch, scene, str(temporary), version)


@pytest.fixture(params=['5.8', 'main'])
def app(request, monkeypatch, scene, tmp_path):
    """slicer.app and what NNUNetCAM.py imports from the app, as in Slicer 5.8 and in main, over a real scene."""
    return install_app(monkeypatch, scene, tmp_path, request.param)


def load_module():
    spec = importlib.util.spec_from_file_location('NNUNetCAM', MODULE / 'NNUNetCAM.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_panel(module):
    return slicer_standin.openPanel(module)


def items(combo):
    return [combo.itemText(i) for i in range(combo.count)]


def log_lines(ui):
    return ui.logTextEdit.toPlainText().splitlines()


def test_panel_binds_the_parameter_node_through_its_lifecycle(app, scene, model3d, monkeypatch):
    a, b = (volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), name) for name in ('A', 'B'))
    module = load_module()
    widget = open_panel(module)
    ui, node = widget.ui, widget._parameterNode
    # bound, with a tag kept for disconnecting, to widgets of the .ui file; the rest is set from code
    assert widget._parameterNodeGuiTag is not None
    bound, mapping = app.connections[-1]
    assert bound is node and set(module.NNUNetCAMParameterNode.allParameters) - set(mapping) == {
        'modelFolder', 'targetClass', 'targetLayer', 'method'}
    assert {id(w) for w in mapping.values()} <= {id(w) for w in vars(ui).values()}
    # parameter node -> widgets -> parameter node
    assert node.inputVolume is a and ui.inputVolumeSelector.currentNode() is a
    ui.inputVolumeSelector.setCurrentNode(b)
    ui.ttaCheckBox.checked = False
    ui.deviceComboBox.currentText = 'cpu'
    ui.thresholdSlider.value = 0.35
    assert (node.inputVolume, node.tta, node.device, node.threshold) == (b, False, 'cpu', 0.35)
    node.opacity = 0.8
    assert ui.opacitySlider.value == 0.8
    # Apply follows the parameter node (its observer)
    ui.modelFolderPathLineEdit.currentPath = str(model3d)
    app.runPending()  # the core lists layers and methods
    assert ui.targetLayerComboBox.count > 1 and ui.methodComboBox.count > 1 and ui.applyButton.enabled
    node.inputVolume = None
    assert not ui.applyButton.enabled
    node.inputVolume = b
    assert ui.applyButton.enabled
    # Apply runs on what the panel shows
    calls = []
    monkeypatch.setattr(widget.logic, 'run', lambda *args, **kwargs: calls.append((args, kwargs))
                        or types.SimpleNamespace(running=False, log=['core']))
    ui.applyButton.click()
    (args, kwargs), = calls
    assert args[0] is b and (kwargs['device'], kwargs['tta'], kwargs['method']) == ('cpu', False, 'gradcam')
    assert (kwargs['displayOptions'].threshold, kwargs['displayOptions'].opacity) == (0.35, 0.8)
    # leaving the module disconnects the panel and the observer
    cam = volume_from_array(scene, np.linspace(0, 1, 120, dtype=np.float32).reshape(4, 5, 6), np.eye(4), 'B CAM')
    display.style_cam(scene, cam, 'Rainbow')
    node.camVolume, node.colormap = cam, 'Rainbow'
    widget.exit()
    assert widget._parameterNodeGuiTag is None
    ui.ttaCheckBox.checked = True
    node.opacity = 0.3
    node.inputVolume = None
    assert not node.tta and ui.opacitySlider.value == 0.8 and ui.applyButton.enabled
    # entering again shows the node; the refilled colormap list ('' on the way) redraws the CAM
    node.inputVolume = b
    widget.enter()
    assert widget._parameterNodeGuiTag is not None
    assert (ui.ttaCheckBox.checked, ui.opacitySlider.value, ui.colormapComboBox.currentText) == (False, 0.3, 'Rainbow')
    assert scene.GetNthNodeByClass(0, 'vtkMRMLSliceCompositeNode').GetForegroundVolumeID() == cam.GetID()
    # closing the scene rebinds a fresh parameter node
    scene.Clear(0)
    assert widget._parameterNodeGuiTag is not None and widget._parameterNode.tta
    assert ui.ttaCheckBox.checked and ui.inputVolumeSelector.currentNode() is None
    # after cleanup the panel no longer follows the scene
    widget.cleanup()
    kept = widget._parameterNode
    scene.Clear(0)
    assert widget._parameterNode is kept
    assert app.slotErrors == []


def test_every_bound_widget_has_the_annotation_its_connector_needs(app, scene):
    """What Slicer's connectors demand, for the mapping the panel passes at runtime: a QComboBox a Choice, a
    ctkSliderWidget a float WithinRange, a qMRMLNodeComboBox a node type, a QCheckBox a bool."""
    module = load_module()
    open_panel(module)
    _, mapping = app.connections[-1]
    has = lambda annotations, cls: any(isinstance(a, cls) for a in annotations)  # noqa: E731
    needs = {'QComboBox': lambda kind, annotations: has(annotations, slicer_standin.Choice) or (
                 isinstance(kind, type) and issubclass(kind, slicer_standin.enum.Enum)),
             'ctkSliderWidget': lambda kind, annotations: kind is float and has(annotations, slicer_standin.WithinRange),
             'qMRMLNodeComboBox': lambda kind, annotations: issubclass(kind, slicer.vtkMRMLNode),
             'QCheckBox': lambda kind, annotations: kind is bool}
    for name, widget in mapping.items():
        kind, annotations, _ = module.NNUNetCAMParameterNode.allParameters[name]
        assert needs[type(widget).__name__](kind, annotations), (name, type(widget).__name__, kind, annotations)


def test_install_hands_torch_to_the_pytorch_extension_and_the_rest_to_pip(app, scene, monkeypatch):
    module = load_module()
    widget = open_panel(module)
    monkeypatch.setattr(module, 'missing_requirements', lambda file: ['torch>=2.1', 'torchvision>=0.16', 'nnunetv2>=2.5'])
    torch = []

    class PyTorchUtilsLogic:  # the signature in SlicerPyTorch's PyTorchUtils.py
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            torch.append((askConfirmation, torchVersionRequirement, torchvisionVersionRequirement))
    monkeypatch.setitem(sys.modules, 'PyTorchUtils', types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    assert widget.onInstall()
    assert torch == [(False, '>=2.1', '>=0.16')]
    (_, pip), = app.dialogs
    assert pip[0] == '-c' and pip[2:] == ['nnunetv2>=2.5']
    # a wait cursor only where pip_install shows no progress dialog of its own (up to 5.10)
    assert app.waitCursors == (1 if app.version == '5.8' else 0)
    # a pip failure: after 5.10 Slicer has shown it with pip's log, so the module adds no second dialog
    app.pipError = subprocess.CalledProcessError(1, ['PythonSlicer', '-m', 'pip'])
    app.dialogs.clear()
    assert not widget.onInstall()
    assert [kind for kind, _ in app.dialogs].count('error') == (1 if app.version == '5.8' else 0)
    # a torch failure is the module's to show, in one line that names the fix

    def fails(self, **kwargs):
        raise subprocess.CalledProcessError(1, ['PythonSlicer', '-m', 'light_the_torch'])
    monkeypatch.setattr(PyTorchUtilsLogic, 'installTorch', fails)
    app.dialogs.clear()
    assert not widget.onInstall()
    (kind, text), = app.dialogs
    assert kind == 'error' and 'PyTorch Utils module' in text and '\n' not in text


def test_self_test_reports_a_missing_python_instead_of_skipping(app, scene, tmp_path):
    """Reload and Test calls runTest() directly, where a skipped test shows as a failure."""
    module = load_module()
    app.settings[module.PYTHON_SETTING] = str(tmp_path / 'no such env' / 'python')
    try:
        module.NNUNetCAMTest().runTest()
    except unittest.SkipTest as e:
        pytest.fail(f'skipTest({e}) shows as a failed test in Slicer')
    (kind, text), = app.dialogs
    assert kind == 'delay' and text.startswith('Test not run: ') and 'does not exist' in text


def test_self_test_runs_in_the_app_and_keeps_it_responsive(monkeypatch, scene, tmp_path, model3d):
    """In Slicer's own Python, with a temporary folder whose path has a space; events are processed throughout."""
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    load_module().NNUNetCAMTest().runTest()
    assert app.dialogs[-1] == ('delay', 'Test passed') and app.events > 20


# --- static checks of the module's files ---
def test_every_widget_the_module_uses_is_in_the_ui_file():
    import xml.etree.ElementTree as ET
    used = set(re.findall(r'self\.ui\.(\w+)', (MODULE / 'NNUNetCAM.py').read_text()))
    ui = ET.parse(MODULE / 'Resources' / 'UI' / 'NNUNetCAM.ui').getroot()
    declared = [e.get('name') for e in ui.iter() if e.tag in ('widget', 'layout')]
    assert len(declared) == len(set(declared)), 'duplicate names in NNUNetCAM.ui'
    assert used and not used - set(declared), f'not in NNUNetCAM.ui: {sorted(used - set(declared))}'
    custom = {e.findtext('class') for e in ui.iter('customwidget')}
    assert {e.get('class') for e in ui.iter('widget') if not e.get('class').startswith('Q')} <= custom
    # Qt Designer keeps children only in a custom widget declared a container
    containers = {e.findtext('class') for e in ui.iter('customwidget') if e.findtext('container') == '1'}
    parents = {e.get('class') for e in ui.iter('widget') if e.get('class') in custom and e.find('.//widget') is not None}
    assert parents <= containers, f'not declared <container>1</container>: {sorted(parents - containers)}'


def test_lib_imports_without_qt_ctk_or_the_app(model3d):
    code = ('import sys, importlib.abc\n'
            'class Block(importlib.abc.MetaPathFinder):\n'
            '    def find_spec(self, name, path, target=None):\n'
            '        if name.split(".")[0] in ("qt", "ctk", "PythonQt", "slicer.app"):\n'
            '            raise ImportError("blocked: " + name)\n'
            'sys.meta_path.insert(0, Block())\n'
            'import NNUNetCAMLib, NNUNetCAMLib.logic, NNUNetCAMLib.volumes, NNUNetCAMLib.display, slicer\n'
            'assert not hasattr(slicer, "app") and "qt" not in sys.modules and "torch" not in sys.modules\n'
            'info = NNUNetCAMLib.model_info(sys.argv[1])\n'
            'assert "torch" not in sys.modules, "model_info must not import torch"\n'
            'print(info["configuration"])\n')
    env = {**os.environ, 'PYTHONPATH': str(MODULE)}
    p = subprocess.run([sys.executable, '-c', code, str(model3d)], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == '3d_fullres', p.stderr[-2000:]


def test_cmake_lists_every_script_and_resource():
    module_cmake = (MODULE / 'CMakeLists.txt').read_text().replace('${MODULE_NAME}', 'NNUNetCAM')
    scripts = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob('*.py') if '__pycache__' not in p.parts}
    core = {p.relative_to(ROOT).as_posix() for p in (ROOT / 'nnunetv2_cam_core').rglob('*.py')
            if '__pycache__' not in p.parts}
    listed = set(re.findall(r'^\s+(\S+\.(?:py|png|ui|txt))\s*$', module_cmake, re.M))
    assert scripts | core <= listed, f'not listed: {sorted((scripts | core) - listed)}'
    # and nothing listed that is gone (CMake would fail the extension's build)
    gone = [f for f in listed if f.endswith('.py') and not (MODULE / f).is_file() and not (ROOT / f).is_file()]
    assert not gone, f'listed but missing: {gone}'
    for resource in (r for r in listed if not r.endswith('.py')):
        assert (MODULE / resource).is_file(), resource
    assert 'WITH_GENERIC_TESTS' in module_cmake and 'slicerMacroBuildScriptedModule' in module_cmake
    assert 'add_subdirectory(NNUNetCAM)' in (ROOT / 'CMakeLists.txt').read_text()
    assert 'import imp\n' not in (MODULE / 'NNUNetCAM.py').read_text()


def test_catalog_entry_passes_the_extensions_index_checks_that_run_offline():
    """The rules of Slicer/ExtensionsIndex scripts/check_description_files.py that need no network, and the
    catalog-entry schema v1.0.1 (Slicer's Schemas/). Online only: the image URLs answer and the GitHub repository
    has the '3d-slicer-extension' topic."""
    path = ROOT / 'ExtensionsIndex' / 'NNUNetCAM.json'
    name = path.stem
    assert b'\r' not in path.read_bytes()  # check_json_file_format: LF only
    entry = json.loads(path.read_text())
    # the schema: required keys, no others, their types
    assert {'$schema', 'category', 'scm_url'} <= set(entry) <= {
        '$schema', 'build_dependencies', 'build_subdirectory', 'category', 'enabled', 'scm_revision', 'scm_type',
        'scm_url', 'tier'}
    assert entry['$schema'] == ('https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/'
                                'slicer-extension-catalog-entry-schema-v1.0.1.json#')
    assert entry.get('scm_type', 'git') in ('git', 'local') and 1 <= entry.get('tier', 1) <= 5
    # check_extension_name, check_scm_url_syntax, check_git_repository_name
    assert not name.lower().startswith('slicer')
    assert urlsplit(entry['scm_url']).scheme in ('git', 'https')
    repository = Path(urlsplit(entry['scm_url'].strip().strip('/')).path).stem
    assert repository.startswith('Slicer'), f'the repository name {repository!r} must start with Slicer'
    # check_category: a category of the index, the one the extension declares
    top = (ROOT / 'CMakeLists.txt').read_text()
    assert entry['category'] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', top).group(1) == 'Segmentation'
    # check_cmakelists_content: project() is the extension name; icon and screenshots are http URLs to files here
    assert re.findall(r'project\s*\(\s*([^\s\)\n\r]+)', top, re.I)[0] == name
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', top, re.I)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', top, re.I)
    assert icon and screenshots
    raw = f'https://raw.githubusercontent.com{urlsplit(entry["scm_url"]).path.removesuffix(".git")}/' \
          f'{entry["scm_revision"]}/'
    for url in [icon[0], *screenshots[0].split()]:
        assert url.startswith(raw) and url.endswith('.png'), url
        assert (ROOT / url[len(raw):]).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', url
    assert re.search(r'set\(EXTENSION_HOMEPAGE "https://github.com' + urlsplit(entry['scm_url']).path.removesuffix(
        '.git') + r'[#"]', top)
    for key in ('EXTENSION_CONTRIBUTORS', 'EXTENSION_DESCRIPTION', 'EXTENSION_DEPENDS'):
        assert re.search(rf'set\({key} "[^"]+"\)', top), key
    assert entry['build_dependencies'] == re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', top).group(1).split()
    # check_license_file: at the root, the license pyproject.toml declares
    license_text = (ROOT / 'LICENSE').read_text()
    declared = re.search(r'^license = "([^"]+)"', (ROOT / 'pyproject.toml').read_text(), re.M).group(1)
    assert declared == 'Apache-2.0' and 'Apache License' in license_text and 'Version 2.0, January 2004' in license_text
    # check_repository_size: under 100 MB checked out
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert sum((ROOT / f).stat().st_size for f in files.split('\0') if f and (ROOT / f).is_file()) < 100 * 2 ** 20


# --- other kinds of model (model_kinds.py) ---
def segment_arrays(scene, segmentation, reference) -> dict:
    """name -> the segment's voxels on the reference grid, one segment at a time (overlaps kept)."""
    seg, out = segmentation.GetSegmentation(), {}
    for i in range(seg.GetNumberOfSegments()):
        labelmap = scene.AddNewNodeByClass('vtkMRMLLabelMapVolumeNode', 'export')
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(seg.GetNthSegmentID(i))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap,
                                                                                    reference)
        out[seg.GetNthSegment(i).GetName()] = slicer.util.arrayFromVolume(labelmap) > 0
        scene.RemoveNode(labelmap)
    return out


def test_region_model_loads_one_segment_per_region_and_they_overlap(scene, tmp_path):
    from conftest import kind_model
    from nnunetv2_cam_core.model_kinds import write_kind_case
    model = kind_model('regions')
    case = write_kind_case('regions', tmp_path / 'case')
    volume = load_volume(scene, case / 'case_0000.nii.gz', 'Kidney CT')
    transform = scene.AddNewNodeByClass('vtkMRMLLinearTransformNode', 'registration')  # not the identity
    transform.SetMatrixTransformToParent(volumes._matrix(oblique_ijk_to_ras()))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    (tmp_path / 'tmp').mkdir()
    logic = NNUNetCAMLogic(scene, temp_root=str(tmp_path / 'tmp'))
    result = logic.run(volume, model, targetClass=['kidney', 'masses'], layers=['last_decoder'], device='cpu',
                       tta=False, outputFolder=str(tmp_path / 'kept'))
    assert set(result.cams) == {'kidney', 'masses'}
    segments = segment_arrays(scene, result.segmentation, volume)
    assert list(segments) == ['kidney', 'masses', 'tumor']  # dataset.json's regions, in its order
    assert result.segmentation.GetTransformNodeID() == transform.GetID()
    labels = slicer.util.arrayFromVolume(load_volume(scene, tmp_path / 'kept' / 'Kidney_CT.nii.gz', 'labels'))
    for name, covered in {'kidney': [1, 2, 3], 'masses': [2, 3], 'tumor': [2]}.items():
        np.testing.assert_array_equal(segments[name], np.isin(labels, covered))
    assert segments['masses'].any() and (segments['masses'] <= segments['kidney']).all()
    assert (segments['tumor'] <= segments['masses']).all()
    colors = {tuple(result.segmentation.GetSegmentation().GetNthSegment(i).GetColor()) for i in range(3)}
    assert len(colors) == 3


def test_panel_runs_a_two_channel_model_through_its_channel_selectors(app, scene, tmp_path):
    """Selectors labelled from channel_names, the ignore label never offered, and Apply runs the real core on the
    volumes picked for each channel."""
    from conftest import kind_model
    from nnunetv2_cam_core.model_kinds import write_kind_case
    model = kind_model('multichannel')
    case = write_kind_case('multichannel', tmp_path / 'case')
    t1, t2 = (load_volume(scene, case / f'case_{c:04d}.nii.gz', name) for c, name in enumerate(('MR T1', 'MR T2')))
    module = load_module()
    widget = open_panel(module)
    ui = widget.ui
    ui.modelFolderPathLineEdit.currentPath = str(model)
    app.runPending()
    assert ui.inputVolumeLabel.text == 'T1 volume:' and ui.channel1Label.text == 'T2 (channel 1):'
    assert ui.channel1Selector.visible and not ui.channel2Selector.visible
    assert items(ui.targetClassComboBox) == ['lesion', 'cyst']
    ui.inputVolumeSelector.setCurrentNode(t1)
    ui.channel1Selector.setCurrentNode(t2)
    ui.targetClassComboBox.currentText = 'lesion'
    ui.deviceComboBox.currentText = 'cpu'
    ui.ttaCheckBox.checked = False
    assert ui.applyButton.enabled
    try:
        ui.applyButton.click()
        app.runPending(seconds=300)
    finally:
        widget.cleanup()  # the server it started on this computer
    assert app.slotErrors == [] and not [d for d in app.dialogs if d[0] == 'error'], app.dialogs
    assert ui.statusLabel.text.startswith('Done'), ui.statusLabel.text
    cam = widget._parameterNode.camVolume
    assert cam.GetName() == 'MR T1 CAM lesion gradcam'
    assert cam.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
    arr = slicer.util.arrayFromVolume(cam)
    assert np.isfinite(arr).all() and arr.max() == pytest.approx(1.0)


def test_cascade_model_folder_just_works_and_progress_shows_both_stages(scene, tmp_path):
    from conftest import kind_model
    from nnunetv2_cam_core.model_kinds import write_kind_case
    model = kind_model('cascade')
    case = write_kind_case('cascade', tmp_path / 'case')
    volume = load_volume(scene, case / 'case_0000.nii.gz', 'Abdomen CT')
    (tmp_path / 'tmp').mkdir()
    logic = NNUNetCAMLogic(scene, temp_root=str(tmp_path / 'tmp'))
    progress = []
    result = logic.run(volume, model, targetClass=['kidney'], device='cpu', tta=False,
                       onProgress=lambda f, text: progress.append((f, text)))
    texts = [t for _, t in progress]
    first_low = next(i for i, t in enumerate(texts) if t.startswith('Low-resolution stage'))
    first_tile = next(i for i, t in enumerate(texts) if t.startswith('Sliding window'))
    assert first_low < first_tile
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions)  # never backwards
    assert set(result.cams) == {'kidney'} and result.sidecar['previous_stage']['folds'] == ['all']
    arr = slicer.util.arrayFromVolume(result.cams['kidney'])
    assert np.isfinite(arr).all() and arr.max() == pytest.approx(1.0)
    assert list(tmp_path.joinpath('tmp').iterdir()) == []


def test_evaluation_loads_a_table_the_curves_in_a_plot_and_the_fold_spread(scene, model3d, small_case, tmp_path):
    """evaluate=True: the numbers in a table node, the curves in a plot chart (the user's layout kept: a note names
    the chart), a sanity line; foldSpread=True: one more volume per class on the input's grid, with its own legend."""
    volume = load_volume(scene, small_case, 'Small scan')
    layout = scene.AddNewNodeByClass('vtkMRMLLayoutNode')
    layout.SetViewArrangement(layout.SlicerLayoutFourUpView)
    plots = slicer.vtkSlicerPlotsLogic()
    plots.SetMRMLScene(scene)
    logic = NNUNetCAMLogic(scene, temp_root=str(tmp_path), plots_logic=plots)
    progress = []
    result = logic.run(volume, model3d, targetClass='lesion', layers=['last_decoder'], folds=[0, 1], device='cpu',
                       tta=False, evaluate=True, evaluationSteps=4, foldSpread=True,
                       onProgress=lambda f, text: progress.append((f, text)))
    table = result.evaluationTable.GetTable()
    assert table.GetNumberOfRows() == 1 and table.GetColumnByName('class').GetValue(0) == 'lesion'
    e = result.sidecar['classes']['lesion']['evaluation']
    assert table.GetColumnByName('deletion AUC').GetValue(0) == pytest.approx(e['deletion_auc'])
    assert table.GetColumnByName('sanity check').GetValue(0) == ('yes' if e['sanity']['passes'] else 'no')
    chart = result.evaluationChart
    series = [scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(i)) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in series] == ['lesion deletion', 'lesion deletion, random',
                                                   'lesion insertion', 'lesion insertion, random']
    curves = series[0].GetTableNode().GetTable()
    assert curves.GetNumberOfRows() == 5
    assert [curves.GetColumnByName('lesion deletion').GetValue(i) for i in range(5)] == pytest.approx(e['deletion'])
    assert layout.GetViewArrangement() == layout.SlicerLayoutFourUpView  # kept: it has no plot view
    assert f'the deletion and insertion curves are in the plot chart "{chart.GetName()}": choose a layout with a ' \
           f'plot view to see them' in result.notes
    assert any(n.startswith('lesion: OK: the map passes the sanity check') or n.startswith('lesion: WARNING')
               for n in result.notes)
    spread = result.foldSpread['lesion']
    assert spread.GetName() == 'Small scan fold spread lesion gradcam'
    assert np.abs(volumes.ijk_to_ras(spread) - volumes.ijk_to_ras(volume)).max() < 1e-4
    assert spread.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(spread) is not None
    texts = [t for _, t in progress]
    assert any(t.startswith('Evaluating the map') and 'step' in t for t in texts)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert list(tmp_path.iterdir()) == []


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f'/proc/{pid}').exists() and 'Z' not in Path(f'/proc/{pid}/stat').read_text().split()[2]


def test_runs_on_a_local_server_started_once_reused_and_shut_down(scene, input_volume, model3d, tmp_path):
    """Compute on this computer: the first run starts `nnunetv2_cam serve` and leaves it running; the maps equal a
    per-run core process's; another class does no preprocessing and loads no model; "Explain here" with a point
    and with an ROI runs the region's tiles alone and adds nodes on the input's grid; cleanup stops the server."""
    temp_root = tmp_path / 'tmp'
    temp_root.mkdir()
    logic = NNUNetCAMLogic(scene, temp_root=str(temp_root))
    common = dict(layers=['last_decoder'], folds=[0], device='cpu', tta=False)
    alone = logic.run(input_volume, model3d, targetClass='lesion', **common)
    assert logic.serverStatus() == 'not started'
    try:
        progress = []
        served = logic.run(input_volume, model3d, targetClass='lesion', server='local',
                           onProgress=lambda f, text: progress.append(text), **common)
        pid = logic.localServer.process.pid
        assert _process_alive(pid) and 'no model loaded' not in logic.serverStatus()
        np.testing.assert_allclose(slicer.util.arrayFromVolume(served.cams['lesion']),
                                   slicer.util.arrayFromVolume(alone.cams['lesion']), atol=1e-5)
        assert np.abs(volumes.ijk_to_ras(served.cams['lesion']) - volumes.ijk_to_ras(input_volume)).max() < 1e-4
        assert served.cams['lesion'].GetTransformNodeID() == input_volume.GetTransformNodeID()
        assert any(t.startswith('Sending the case') for t in progress) and any('tile' in t for t in progress)
        counters = logic.localServer.connection.client.health()['counters']
        organ = logic.run(input_volume, model3d, targetClass='organ', server='local', **common)
        assert logic.localServer.process.pid == pid  # reused
        assert logic.localServer.connection.client.health()['counters'] == {
            **counters, 'jobs_run': counters['jobs_run'] + 1, 'tiles_run': counters['tiles_run'] + organ.sidecar['tiles'],
            # no model load, no preprocessing, and at the last decoder stage no forward pass
            'forwards_from_layer_cache': counters['forwards_from_layer_cache'] + organ.sidecar['tiles']}
        assert 'preprocessed case' in organ.sidecar['server']['reused']
        assert organ.sidecar['forwards_from_layer_cache'] == organ.sidecar['tiles']
        # Explain here: one click, and an ROI
        arr = slicer.util.arrayFromVolume(input_volume)
        peak = np.unravel_index(np.argmax(arr), arr.shape)
        ras = (volumes.ijk_to_ras(input_volume) @ np.array([*peak[::-1], 1]))[:3]
        point = scene.AddNewNodeByClass('vtkMRMLMarkupsFiducialNode', 'here')
        point.AddControlPoint(*ras)
        here = logic.run(input_volume, model3d, targetClass='lesion', server='local', targetPoint=point,
                         pointRadiusMm=4, **common)
        assert here.sidecar['server']['target_mask'] == 'region' and here.sidecar['tiles'] < alone.sidecar['tiles']
        assert here.cams['lesion'].GetImageData().GetDimensions() == input_volume.GetImageData().GetDimensions()
        roi = scene.AddNewNodeByClass('vtkMRMLMarkupsROINode')
        roi.SetCenterWorld(*ras)
        roi.SetSize(6, 6, 6)
        boxed = logic.run(input_volume, model3d, targetClass='lesion', server='local', targetRoi=roi, **common)
        assert boxed.sidecar['server']['target_mask'] == 'region' and boxed.sidecar['tiles'] < alone.sidecar['tiles']
        assert list(temp_root.iterdir()) == []  # every run's temporary folder removed
    finally:
        logic.cleanup()
    time.sleep(0.5)
    assert not _process_alive(pid) and logic.serverStatus() == 'not started'


def test_a_server_killed_mid_run_is_reported_and_adds_nothing(scene, input_volume, model3d, tmp_path):
    temp_root = tmp_path / 'tmp'
    temp_root.mkdir()
    logic = NNUNetCAMLogic(scene, temp_root=str(temp_root))
    try:
        logic.localServer.connect(model3d, 'cpu')
        work = Path(logic.localServer.work)
        nodes = node_ids(scene)
        errors = []
        run = logic.run(input_volume, model3d, targetClass='lesion', folds=[0, 1], device='cpu', tta=True,
                        server='local', wait=False, onError=errors.append)
        while run.poll() and run.fraction < STAGE_TILES:
            time.sleep(0.05)
        logic.localServer.process.cancel()  # the server dies
        while run.poll():
            time.sleep(0.05)
        assert run.state == 'failed' and 'does not answer' in errors[0] and '\n' not in errors[0]
        assert node_ids(scene) == nodes and list(temp_root.iterdir()) == []
        # it did not answer: stopped, its own files removed, and the next run starts a new one
        assert logic.localServer.process is None and not work.exists()
    finally:
        logic.cleanup()
    assert not work.exists()


def test_evaluation_is_refused_on_a_server(scene, input_volume, model3d):
    logic = NNUNetCAMLogic(scene)
    with pytest.raises(ValueError, match='without a server'):
        logic.run(input_volume, model3d, server='local', evaluate=True)
    assert logic.localServer.process is None  # refused before starting anything


def test_panel_computes_on_this_computer_and_explains_here(monkeypatch, scene, input_volume, model3d, tmp_path):
    """The panel's default: a server on this computer, kept between Applies (the status line says what it holds);
    a point from the Target region section explains just there; 'a new process per run' needs no server;
    leaving Slicer (the module's cleanup) stops the server."""
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = open_panel(load_module())
    ui, node = widget.ui, widget._parameterNode
    assert ui.computeOnComboBox.currentText == 'this computer'
    ui.modelFolderPathLineEdit.currentPath = str(model3d)
    app.runPending()
    node.inputVolume, node.device, node.tta, node.targetClass = input_volume, 'cpu', False, 'lesion'
    for box in widget._foldBoxes[1:]:
        box.checked = False
    ui.applyButton.click()
    app.runPending(seconds=300)
    assert ui.statusLabel.text.startswith('Done'), (ui.statusLabel.text, app.dialogs)
    full = widget._run.result.sidecar
    assert ui.serverStatusLabel.text.startswith('Server: http://127.0.0.1') and '1 case(s) uploaded' in \
        ui.serverStatusLabel.text
    pid = widget.logic.localServer.process.pid
    arr = slicer.util.arrayFromVolume(input_volume)
    peak = np.unravel_index(np.argmax(arr), arr.shape)
    point = scene.AddNewNodeByClass('vtkMRMLMarkupsFiducialNode', 'here')
    point.AddControlPoint(*(volumes.ijk_to_ras(input_volume) @ np.array([*peak[::-1], 1]))[:3])
    node.targetPoint, node.pointRadiusMm = point, 5.0
    ui.applyButton.click()
    app.runPending(seconds=300)
    here = widget._run.result.sidecar
    assert ui.statusLabel.text.startswith('Done') and widget.logic.localServer.process.pid == pid
    assert here['server']['target_mask'] == 'region' and here['tiles'] < full['tiles']
    node.targetPoint = None
    ui.computeOnComboBox.currentText = 'a new process per run'
    assert node.computeOn.name == 'process'
    ui.applyButton.click()
    app.runPending(seconds=300)
    assert ui.statusLabel.text.startswith('Done') and 'server' not in widget._run.result.sidecar
    widget.cleanup()
    time.sleep(0.5)
    assert not _process_alive(pid) and app.slotErrors == []


def test_a_server_that_cannot_start_says_why_and_the_panel_runs_a_process(monkeypatch, scene, input_volume, model3d,
                                                                        tmp_path):
    from NNUNetCAMLib.server import LocalServer, ServerStartError
    script = tmp_path / 'python'
    script.write_text('#!/bin/sh\necho "No module named fastapi" >&2\nexit 1\n')
    script.chmod(0o755)
    with pytest.raises(ServerStartError, match='did not start: No module named fastapi'):
        LocalServer(PythonEnvironment(str(script)), str(tmp_path)).connect(model3d)
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = open_panel(load_module())
    ui, node = widget.ui, widget._parameterNode
    ui.modelFolderPathLineEdit.currentPath = str(model3d)
    app.runPending()
    node.inputVolume, node.device, node.tta, node.targetClass = input_volume, 'cpu', False, 'lesion'
    monkeypatch.setattr(widget.logic.localServer, 'connect', lambda *a: (_ for _ in ()).throw(
        ServerStartError('the local explanation server did not start: No module named fastapi')))
    ui.applyButton.click()
    app.runPending(seconds=300)
    assert ui.statusLabel.text.startswith('Done') and 'server' not in widget._run.result.sidecar
    assert any(line.endswith('No module named fastapi; running in a new process instead')
               for line in log_lines(ui))
    assert ui.serverStatusLabel.text == 'Server not started: the local explanation server did not start: No module ' \
                                        'named fastapi'
    widget.cleanup()


def test_panel_computes_on_a_remote_server_with_its_url_and_token_file(monkeypatch, scene, input_volume, model3d,
                                                                        results_dir, tmp_path):
    """Compute on 'a server': URL and token file (remembered: the URL and the file's path, never the token, and
    nothing of it in the scene); a wrong token is one line in the status; Connect lists the server's models, the
    classes and folds come from the server, the evaluation (local only) is refused before Apply, and Apply runs
    there and loads the results on the input's grid."""
    from conftest import start_server
    token_file = tmp_path / 'token'
    proc, listening = start_server(results_dir, tmp_path)
    try:
        token = token_file.read_text().strip()
        app = install_app(monkeypatch, scene, tmp_path, 'main')
        widget = open_panel(load_module())
        ui, node = widget.ui, widget._parameterNode
        assert not ui.serverUrlLineEdit.visible and ui.modelFolderPathLineEdit.visible
        ui.computeOnComboBox.currentText = 'a server'
        assert node.computeOn.name == 'server' and ui.serverUrlLineEdit.visible and ui.serverModelComboBox.visible
        assert not ui.modelFolderPathLineEdit.visible and not ui.applyButton.enabled
        wrong = tmp_path / 'wrong'
        wrong.write_text('0' * 64)
        ui.serverUrlLineEdit.text = listening['url']
        ui.serverTokenFilePathLineEdit.currentPath = str(wrong)
        ui.connectServerButton.click()
        assert 'Not connected: server: 401' in ui.serverStatusLabel.text and ui.serverModelComboBox.count == 0
        ui.serverTokenFilePathLineEdit.currentPath = str(token_file)
        ui.connectServerButton.click()
        assert ui.serverStatusLabel.text.startswith(f'Server: {listening["url"]}')
        model = str(model3d.relative_to(results_dir))
        node.targetLayer = 'decoder.stages.1'  # saved from a local model: not offered for a server's model
        ui.serverModelComboBox.currentText = model
        assert ui.serverModelComboBox.currentText == model
        assert items(ui.targetClassComboBox) == \
            ['lesion', 'organ'] and [b.text for b in widget._foldBoxes] == ['0', '1']
        assert ui.targetLayerComboBox.currentText == 'last decoder stage' and node.targetLayer == 'last_decoder'
        node.inputVolume, node.device, node.tta, node.targetClass = input_volume, 'cpu', False, 'lesion'
        for box in widget._foldBoxes[1:]:
            box.checked = False
        assert ui.applyButton.enabled
        node.evaluate = True  # runs on this computer only
        assert not ui.applyButton.enabled and 'run on this computer' in ui.applyButton.toolTip
        node.evaluate = False
        ui.applyButton.click()
        app.runPending(seconds=300)
        assert ui.statusLabel.text.startswith('Done'), (ui.statusLabel.text, app.dialogs)
        result = widget._run.result
        assert result.sidecar['server']['target_mask'] == 'tile ensemble' and result.sidecar['folds'] == [0]
        cam = result.cams['lesion']
        assert cam.GetImageData().GetDimensions() == input_volume.GetImageData().GetDimensions()
        assert '1 case(s) uploaded' in ui.serverStatusLabel.text
        uploads = widget._connection.client.health()['counters']['uploads']
        ui.applyButton.click()  # the same volume again: not written, not sent
        app.runPending(seconds=300)
        assert ui.statusLabel.text.startswith('Done') and '(case already on the server)' in ui.statusLabel.text
        assert widget._connection.client.health()['counters']['uploads'] == uploads
        assert app.settings['NNUNetCAM/serverUrl'] == listening['url']
        assert app.settings['NNUNetCAM/serverTokenFile'] == str(token_file)
        assert token not in json.dumps(app.settings)
        saved = tmp_path / 'scene.mrml'
        scene.SetURL(str(saved))
        assert scene.Commit()
        assert token not in saved.read_text()
        widget.cleanup()
        assert proc.poll() is None and app.slotErrors == []  # a remote server is not ours to stop
    finally:
        proc.terminate()
        proc.wait(10)


# ExtensionsIndex's .pre-commit-config.yaml (its prettier hook) and .prettierrc.js, at Slicer/ExtensionsIndex main
PRETTIER = ('prettier@3.5.3', 'prettier-plugin-multiline-arrays@4.0.3')
PRETTIERRC = ('module.exports = {plugins: [require.resolve("prettier-plugin-multiline-arrays")], '
              'multilineArraysWrapThreshold: 0};\n')


def prettier_dir() -> Path:
    """The pinned prettier and plugin, installed from npm once into a cache named after their versions."""
    node, npm = shutil.which('node'), shutil.which('npm')
    if not node or not npm:
        pytest.skip('node and npm are needed to run the ExtensionsIndex formatter (apt-get install nodejs npm)')
    cache = Path.home() / '.cache' / 'nnunetcam' / ('prettier-' + '-'.join(p.replace('@', '-') for p in PRETTIER))
    if not (cache / 'node_modules' / 'prettier' / 'bin' / 'prettier.cjs').is_file():
        partial = cache.with_name(f'{cache.name}.{os.getpid()}.partial')
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        p = subprocess.run([npm, 'install', '--no-save', '--no-audit', '--no-fund', '--prefix', str(partial),
                            *PRETTIER], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            if any(s in p.stderr for s in ('ENOTFOUND', 'EAI_AGAIN', 'ECONNREFUSED', 'ETIMEDOUT', 'network')):
                pytest.skip(f'npm registry unreachable: {p.stderr.strip().splitlines()[-1]}')
            raise AssertionError(p.stderr[-2000:])
        try:
            partial.rename(cache)
        except OSError:  # another test process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return cache


def test_catalog_entry_is_formatted_as_the_extensions_index_pre_commit_wants(tmp_path):
    """Their prettier with prettier-plugin-multiline-arrays (wrap threshold 0): every non-empty array one item a
    line. Runs offline once the packages are cached."""
    cache = prettier_dir()
    (tmp_path / '.prettierrc.js').write_text(PRETTIERRC)
    entry = tmp_path / 'NNUNetCAM.json'
    shutil.copy(ROOT / 'ExtensionsIndex' / 'NNUNetCAM.json', entry)
    env = {**os.environ, 'NODE_PATH': str(cache / 'node_modules'), 'npm_config_offline': 'true'}
    p = subprocess.run([shutil.which('node'), str(cache / 'node_modules' / 'prettier' / 'bin' / 'prettier.cjs'),
                        '--config', str(tmp_path / '.prettierrc.js'), '--check', str(entry)],
                       cwd=cache, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    # the check itself: a one-line array is refused
    entry.write_text(entry.read_text().replace('[\n    "PyTorch"\n  ]', '["PyTorch"]'))
    p = subprocess.run([shutil.which('node'), str(cache / 'node_modules' / 'prettier' / 'bin' / 'prettier.cjs'),
                        '--config', str(tmp_path / '.prettierrc.js'), '--check', str(entry)],
                       cwd=cache, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and 'NNUNetCAM.json' in p.stdout + p.stderr


@pytest.mark.parametrize('regions', [None, {'kidney': [1, 2], 'tumor': [2]}], ids=['labels', 'regions'])
def test_a_loaded_segmentation_is_shown(scene, tmp_path, regions):
    """Labels and regions alike get a segmentation display node, visible in the slice views."""
    arr = np.zeros((6, 7, 8), np.uint8)
    arr[1:4, 2:5, 3:6], arr[2, 3, 4] = 1, 2
    image = sitk.GetImageFromArray(arr)
    sitk.WriteImage(image, str(tmp_path / 'seg.nii.gz'))
    reference = volume_from_array(scene, arr.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]), 'ref')  # LPS file
    node = volumes.load_segmentation(scene, tmp_path / 'seg.nii.gz', 'seg', reference,
                                     {'background': 0, 'kidney': 1, 'tumor': 2}, regions)
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    shown = node.GetDisplayNode()
    assert shown is not None and shown.IsA('vtkMRMLSegmentationDisplayNode') and shown.GetVisibility()


# --- the panel on the real-Qt harness: defects and risks of the second source check ---
SERVER_REQUIREMENTS = MODULE / 'Resources' / 'server-requirements.txt'


@pytest.mark.parametrize('python', ['3.9', '3.12'])  # Slicer 5.8 ships 3.9; 5.10 and main 3.12
def test_requirements_resolve_for_slicers_pythons(python, tmp_path):
    """Every line that applies to that Python (its marker) resolves on the package index; the core's lines apply
    everywhere, the server's where fastapi installs (3.11 and later), so 5.8 runs a process per run."""
    from packaging.requirements import Requirement
    from NNUNetCAMLib.environment import requirement_lines
    environment = {'python_version': python, 'python_full_version': f'{python}.0'}
    core = [Requirement(line) for line in requirement_lines(MODULE / 'Resources' / 'requirements.txt')]
    server = [Requirement(line) for line in requirement_lines(SERVER_REQUIREMENTS)]
    assert {r.name for r in core} == {'torch', 'torchvision', 'nnunetv2', 'grad-cam'}
    assert {r.name for r in server} == {'fastapi', 'uvicorn', 'python-multipart'}
    assert all(r.marker is None for r in core)
    applies = [r for r in core + server if r.marker is None or r.marker.evaluate(environment)]
    assert ({r.name for r in applies} & {r.name for r in server}) == (set() if python == '3.9' else
                                                                       {r.name for r in server})
    for r in applies:
        p = subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-deps', '--ignore-installed',
                            '--python-version', python, '--target', str(tmp_path / 'target'), '--quiet',
                            '--report', str(tmp_path / 'report.json'), str(r).split(';')[0]],
                           capture_output=True, text=True, timeout=600)
        if p.returncode and any(s in p.stderr for s in ('NewConnectionError', 'Temporary failure in name resolution',
                                                        'Max retries exceeded')):
            pytest.skip(f'the package index is unreachable: {p.stderr.strip().splitlines()[-1]}')
        assert p.returncode == 0, (python, str(r), p.stderr[-1000:])
        (found,) = json.loads((tmp_path / 'report.json').read_text())['install']
        requires = found['metadata'].get('requires_python')
        assert not requires or python + '.0' in __import__('packaging.specifiers').specifiers.SpecifierSet(requires)


def panel_with_model(app, model, version_module=None):
    widget = open_panel(version_module or load_module())
    widget.ui.modelFolderPathLineEdit.currentPath = str(model)
    app.runPending()
    return widget


def ready_panel(monkeypatch, scene, tmp_path, model, volume):
    """The panel with a model and a volume, on the CPU, one fold, no TTA: ready to Apply."""
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = panel_with_model(app, model)
    node = widget._parameterNode
    node.inputVolume, node.device, node.tta, node.targetClass = volume, 'cpu', False, 'lesion'
    for box in widget._foldBoxes[1:]:
        box.checked = False
    return app, widget


def record_runs(monkeypatch, widget):
    calls = []
    monkeypatch.setattr(widget.logic, 'run', lambda *args, **kwargs: calls.append((args, kwargs))
                        or types.SimpleNamespace(running=False, log=['core']))
    return calls


def test_on_a_python_where_the_server_does_not_install_each_run_is_a_process(monkeypatch, scene, tmp_path, model3d):
    """Slicer 5.8's Python 3.9: the local server's packages do not install there; Apply asks nothing, installs
    nothing, says why in one log line and runs a process."""
    import platform
    app = install_app(monkeypatch, scene, tmp_path, '5.8')
    widget = panel_with_model(app, model3d)
    node = widget._parameterNode
    node.inputVolume = volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), 'CT')
    monkeypatch.setattr(platform, 'python_version', lambda: '3.9.21')
    monkeypatch.setattr(platform, 'python_version_tuple', lambda: ('3', '9', '21'))
    calls = record_runs(monkeypatch, widget)
    assert node.computeOn.name == 'local' and widget.ui.applyButton.enabled
    widget.ui.applyButton.click()
    (_, kwargs), = calls
    assert kwargs['server'] is None
    why = [line for line in log_lines(widget.ui) if 'running in a new process instead' in line]
    assert len(why) == 1 and 'do not install in Python 3.9' in why[0] and 'fastapi' in why[0], log_lines(widget.ui)
    assert [kind for kind, _ in app.dialogs if kind in ('confirm', 'pip')] == [] and app.slotErrors == []


def test_the_local_servers_packages_are_installed_when_it_is_first_used(monkeypatch, scene, tmp_path, model3d):
    """Where they install but are missing: asked once the server is wanted; Cancel runs a process, OK installs
    them with pip (not with the core's requirements)."""
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    module = load_module()
    widget = panel_with_model(app, model3d, module)
    widget._parameterNode.inputVolume = volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), 'CT')
    real = module.missing_requirements
    monkeypatch.setattr(module, 'missing_requirements', lambda file: real(file) or (
        ['fastapi>=0.165 ; python_version >= "3.11"'] if Path(file).name == 'server-requirements.txt' else []))
    calls = record_runs(monkeypatch, widget)
    app.answers.append(False)
    widget.ui.applyButton.click()
    assert calls[-1][1]['server'] is None and [k for k, _ in app.dialogs] == ['confirm']
    assert 'fastapi' in app.dialogs[0][1] and 'torch' not in app.dialogs[0][1]
    app.answers.append(True)
    widget.ui.applyButton.click()
    assert calls[-1][1]['server'] == 'local'
    pip = [args for kind, args in app.dialogs if kind == 'pip']
    assert len(pip) == 1 and pip[0][2:] == ['fastapi>=0.165 ; python_version >= "3.11"'] and app.slotErrors == []


def test_remote_mode_installs_nothing_and_asks_nothing(monkeypatch, scene, tmp_path, results_dir, model3d):
    from conftest import start_server
    proc, listening = start_server(results_dir, tmp_path)
    try:
        app = install_app(monkeypatch, scene, tmp_path, '5.8')
        module = load_module()
        monkeypatch.setattr(module, 'missing_requirements', lambda file: ['torch>=2.1', 'nnunetv2>=2.5'])
        widget = open_panel(module)
        ui, node = widget.ui, widget._parameterNode
        ui.computeOnComboBox.currentText = 'a server'
        ui.serverUrlLineEdit.text = listening['url']
        ui.serverTokenFilePathLineEdit.currentPath = str(tmp_path / 'token')
        ui.connectServerButton.click()
        ui.serverModelComboBox.currentText = str(model3d.relative_to(results_dir))
        node.inputVolume = volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), 'CT')
        calls = record_runs(monkeypatch, widget)
        assert ui.applyButton.enabled
        ui.applyButton.click()
        (_, kwargs), = calls
        assert kwargs['server'] is widget._connection
        assert [kind for kind, _ in app.dialogs if kind in ('confirm', 'pip')] == [] and app.slotErrors == []
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_dead_or_hanging_local_server_does_not_break_apply(monkeypatch, scene, input_volume, model3d, tmp_path):
    """Died: the next Apply starts it again (one log line) and runs. Hangs: Apply returns at once, the run fails
    when the server does not answer, and the next Apply starts a new server."""
    import signal
    app, widget = ready_panel(monkeypatch, scene, tmp_path, model3d, input_volume)
    ui = widget.ui
    server, hung = widget.logic.localServer, None
    try:
        server.connect(model3d, 'cpu')
        dead = server.process.pid
        server.process.cancel()  # the server dies
        assert ui.applyButton.enabled, ui.applyButton.toolTip
        ui.applyButton.click()
        app.runPending(seconds=300)
        assert ui.statusLabel.text.startswith('Done'), (ui.statusLabel.text, app.dialogs, app.slotErrors)
        assert 'The server on this computer had stopped; starting it again' in log_lines(ui)
        assert server.process.pid != dead and app.slotErrors == []
        hung = server.process.pid
        os.kill(hung, signal.SIGSTOP)  # alive, and answers nothing
        server.connection.client.timeout = 3  # its configured timeout, short for the test
        t0 = time.monotonic()
        ui.applyButton.click()
        assert time.monotonic() - t0 < 1.0 and ui.applyButton.text == 'Cancel'
        app.runPending(seconds=60)
        assert ui.statusLabel.text == 'Failed; see the log.' and 'does not answer' in app.dialogs[-1][1]
        assert server.process is None  # stopped: the next run starts a new one
        ui.applyButton.click()
        app.runPending(seconds=300)
        assert ui.statusLabel.text.startswith('Done') and server.process.pid not in (dead, hung)
        assert app.slotErrors == []
    finally:
        if hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
        widget.cleanup()


def test_reentering_in_server_mode_keeps_the_mode_and_runs_no_local_core(monkeypatch, scene, tmp_path, model3d):
    """On enter() the connector empties and refills Compute on (passing 'this computer'): no local --list-layers,
    the chosen class kept, the server's widgets still shown."""
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = panel_with_model(app, model3d)
    ui, node = widget.ui, widget._parameterNode
    ui.computeOnComboBox.currentText = 'a server'
    node.targetClass = 'organ'
    widget.exit()
    calls = []
    real = widget.logic.callCore
    monkeypatch.setattr(widget.logic, 'callCore', lambda args, *a, **k: calls.append(args) or real(args, *a, **k))
    widget.enter()
    app.runPending()
    assert not [c for c in calls if '--list-layers' in c], calls
    assert node.computeOn.name == 'server' and node.targetClass == 'organ'
    assert ui.serverUrlLineEdit.visible and not ui.modelFolderPathLineEdit.visible and app.slotErrors == []


def test_a_model_folder_that_loads_goes_into_the_recent_folders(monkeypatch, scene, tmp_path, model3d):
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = panel_with_model(app, model3d)
    assert widget._info is not None
    assert app.settings['ctkPathLineEdit/NNUNetCAM/recentModelFolders'] in ([str(model3d)], str(model3d))
    assert open_panel(load_module()).ui.modelFolderPathLineEdit.history() == [str(model3d)]  # the next session
    widget.ui.modelFolderPathLineEdit.currentPath = str(tmp_path)  # not a model: not remembered
    assert open_panel(load_module()).ui.modelFolderPathLineEdit.history() == [str(model3d)]


def test_clearing_the_model_folder_drops_the_model(monkeypatch, scene, tmp_path, model3d):
    """ctkPathLineEdit says nothing on currentPathChanged for an empty field: Apply must not run the old model."""
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = panel_with_model(app, model3d)
    widget._parameterNode.inputVolume = volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), 'CT')
    assert widget.ui.applyButton.enabled
    widget.ui.modelFolderPathLineEdit.currentPath = ''
    assert not widget.ui.applyButton.enabled and widget._parameterNode.modelFolder == ''
    assert widget.ui.targetClassComboBox.count == 0 and app.slotErrors == []


def test_fold_spread_needs_two_folds(monkeypatch, scene, tmp_path, model3d):
    app = install_app(monkeypatch, scene, tmp_path, 'main')
    widget = panel_with_model(app, model3d)
    ui, node = widget.ui, widget._parameterNode
    node.inputVolume = volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), 'CT')
    node.foldSpread = True
    assert ui.applyButton.enabled  # folds 0 and 1
    widget._foldBoxes[1].checked = False
    assert not ui.applyButton.enabled and 'two folds' in ui.applyButton.toolTip
    node.foldSpread = False
    assert ui.applyButton.enabled and app.slotErrors == []


def test_apply_cannot_be_clicked_again_while_the_server_starts(monkeypatch, scene, input_volume, model3d, tmp_path):
    """The server's start processes events for seconds: a second click then (a real click, queued in Qt's event
    loop) starts nothing; one server, one run."""
    from PyQt5.QtCore import Qt as QtKeys
    from PyQt5.QtTest import QTest
    app, widget = ready_panel(monkeypatch, scene, tmp_path, model3d, input_volume)
    ui = widget.ui
    seen, starts = [], []
    connect = widget.logic.localServer.connect
    monkeypatch.setattr(widget.logic.localServer, 'connect', lambda *a: starts.append(1) or connect(*a))

    def click_again():
        seen.append((ui.applyButton.enabled, ui.applyButton.text))
        QTest.mouseClick(ui.applyButton, QtKeys.LeftButton)
    slicer_standin.QtCore.QTimer.singleShot(300, click_again)
    try:
        QTest.mouseClick(ui.applyButton, QtKeys.LeftButton)
        app.runPending(seconds=300)
        assert seen == [(False, 'Starting...')] and len(starts) == 1
        assert ui.statusLabel.text.startswith('Done') and app.slotErrors == []
    finally:
        widget.cleanup()


def test_the_panel_says_which_region_is_explained(app, scene):
    """A segment wins over an ROI, an ROI over a point: the panel says so, and Apply passes that one alone."""
    widget = open_panel(load_module())
    ui, node = widget.ui, widget._parameterNode
    reference = volume_from_array(scene, np.zeros((6, 7, 8), np.float32), np.eye(4), 'CT')
    box = np.zeros((6, 7, 8), np.uint8)
    box[1:3, 2:4, 3:5] = 1
    labelmap = volume_from_array(scene, box, np.eye(4), 'box', label=True)
    segmentation = scene.AddNewNodeByClass('vtkMRMLSegmentationNode', 'lesions')
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    roi = scene.AddNewNodeByClass('vtkMRMLMarkupsROINode', 'box')
    node.targetRoi = roi
    assert 'else the ROI' in ui.targetRuleLabel.text and node.inputVolume is reference
    ui.targetSegmentSelector.setCurrentNode(segmentation)  # with None offered, no segment is chosen yet
    assert ui.targetSegmentSelector.currentSegmentID() == '' and 'else the ROI' in ui.targetRuleLabel.text
    segment = segmentation.GetSegmentation().GetNthSegmentID(0)
    ui.targetSegmentSelector.setCurrentSegmentID(segment)
    assert ui.targetSegmentSelector.currentSegmentID() == segment
    assert ui.targetRuleLabel.text == 'The segment is explained; the ROI ignored.'
    ui.targetSegmentSelector.setCurrentNode(None)
    node.targetPoint = scene.AddNewNodeByClass('vtkMRMLMarkupsFiducialNode', 'here')
    assert ui.targetRuleLabel.text == 'The ROI is explained; the point ignored.' and app.slotErrors == []


def test_saved_scenes_hold_stable_keys_not_labels(app, scene, tmp_path):
    """Compute on is saved by its name: a scene saved before a label changes still opens."""
    module = load_module()
    widget = open_panel(module)
    widget.ui.computeOnComboBox.currentText = 'a server'
    assert widget._parameterNode.parameterNode.GetParameter('computeOn') == 'server'
    widget.exit()
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(module.ComputeOn, 'label', lambda self: {'server': 'a remote server'}.get(self.name,
                                                                                                      self.value))
        widget.enter()
        assert widget.ui.computeOnComboBox.currentText == 'a remote server' and widget.remote()
        assert widget._parameterNode.computeOn is module.ComputeOn.server and app.slotErrors == []
    finally:
        monkeypatch.undo()


def test_a_case_the_server_holds_is_neither_written_nor_sent_again(monkeypatch, scene, input_volume, model3d,
                                                                    tmp_path):
    """Server mode: the volume's voxels and geometry are hashed in memory. Another Apply on the same volume writes no
    file and sends nothing (the server counts no upload) and says the case is already there; one changed voxel is
    another case, sent; a case the server dropped is sent again, without an error."""
    temp_root = tmp_path / 'tmp'
    temp_root.mkdir()
    logic = NNUNetCAMLogic(scene, temp_root=str(temp_root))
    written, write_case = [], volumes.write_case
    monkeypatch.setattr(volumes, 'write_case', lambda *a: written.append(a[3]) or write_case(*a))
    common = dict(targetClass='lesion', layers=['last_decoder'], folds=[0], device='cpu', tta=False, server='local')

    def run():
        progress = []
        result = logic.run(input_volume, model3d, onProgress=lambda f, text: progress.append(text), **common)
        return result, progress, logic.localServer.connection.client.health()['counters']['uploads']
    try:
        _, progress, uploads = run()
        assert len(written) == 1 and not logic.current.process.held and 'Sending the case to the server' in progress
        again, progress, now = run()
        assert now == uploads and len(written) == 1  # nothing written, nothing sent
        assert logic.current.process.held and 'Case already on the server' in progress
        assert 'preprocessed case' in again.sidecar['server']['reused']  # the same case on the server
        slicer.util.arrayFromVolume(input_volume)[0, 0, 0] += 1  # one voxel
        slicer.util.arrayFromVolumeModified(input_volume)
        _, progress, now = run()
        assert now == uploads + 1 and len(written) == 2 and not logic.current.process.held
        client = logic.localServer.connection.client
        for case in set(logic.localServer.connection.cases.values()):  # as --case-ttl-s or --uploads-mb drop them
            client.delete_case(case)
        dropped, progress, now = run()
        assert now == uploads + 2 and len(written) == 3 and 'Sending the case to the server' in progress
        assert dropped.cams['lesion'].GetImageData().GetDimensions() == input_volume.GetImageData().GetDimensions()
        assert list(temp_root.iterdir()) == []
    finally:
        logic.cleanup()


def test_an_unexpected_error_in_a_slot_is_shown_in_a_dialog(app, scene, tmp_path):
    """Slots run in slicer.util.tryWithErrorDisplay, as SlicerMONAIAuto3DSeg's do: an error nobody expected (here a
    chosen Python that is not executable) is shown to the user, not only printed in the Python console."""
    widget = open_panel(load_module())
    python = tmp_path / 'python'
    python.write_text('not a program')
    python.chmod(0o644)
    widget.ui.customPythonRadioButton.checked = True
    widget.ui.pythonPathLineEdit.currentPath = str(python)
    widget.ui.checkEnvironmentButton.click()
    errors = [text for kind, text in app.dialogs if kind == 'error']
    assert len(errors) == 1 and errors[0].startswith('Failed to check the Python environment.') and \
        'Permission denied' in errors[0]
    assert len(app.slotErrors) == 1  # re-raised, as tryWithErrorDisplay does, so PythonQt prints it too
    widget.cleanup()


def test_the_local_servers_output_is_bounded_once_it_listens(tmp_path):
    """Nothing polls the local server's output after its start: the last LocalServer.LOG_LINES lines are kept, the
    rest dropped, and every line is still read (the process never blocks on a full pipe)."""
    from NNUNetCAMLib.process import CoreProcess
    from NNUNetCAMLib.server import LocalServer, _wait_for
    lines = 20000
    script = ('import json, sys\nprint(json.dumps({"event": "listening"}), flush=True)\n'
              f'for i in range({lines}):\n    print("line", i, file=sys.stderr)\n')
    process = CoreProcess([sys.executable, '-c', script])
    listening, _ = _wait_for(process, lambda e: e.get('event') == 'listening', 60, None)
    assert listening is not None
    process.keep_last(LocalServer.LOG_LINES)
    assert process.wait(60) == 0
    kept = [e['message'] for e in process.poll()]
    assert len(kept) == LocalServer.LOG_LINES and kept[-1] == f'line {lines - 1}'


def test_a_point_or_roi_mask_is_drawn_inside_its_bounding_box(scene):
    """The ball around a point and an ROI are evaluated inside their bounding box alone (a CT's whole grid takes
    seconds), on an oblique volume under a scaling parent transform, and equal the whole-grid test of every voxel."""
    m = oblique_ijk_to_ras()
    reference = volume_from_array(scene, np.zeros((40, 50, 60), np.float32), m, 'ref')
    transform = scene.AddNewNodeByClass('vtkMRMLLinearTransformNode')
    scale = np.diag([1.1, 0.9, 1.0, 1.0])
    scale[:3, 3] = (3, -2, 1)
    transform.SetMatrixTransformToParent(volumes._matrix(scale))
    reference.SetAndObserveTransformNodeID(transform.GetID())
    to_world = scale @ m
    k, j, i = np.mgrid[0:40, 0:50, 0:60]
    centres = to_world @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    ijk = np.array([30, 25, 20, 1])
    point = scene.AddNewNodeByClass('vtkMRMLMarkupsFiducialNode')
    point.AddControlPoint(*(to_world @ ijk)[:3])
    radius = 6.0
    where, block = volumes.region_block(reference, point=point, radius_mm=radius)
    every = (np.linalg.norm(centres[:3] - (to_world @ ijk)[:3, None], axis=0) <= radius).reshape(40, 50, 60)
    assert block.shape[0] * block.shape[1] * block.shape[2] < every.size / 20  # the box, not the grid
    np.testing.assert_array_equal(volumes.point_mask(reference, point, radius), every)
    assert block.sum() == every.sum() > 0
    roi = scene.AddNewNodeByClass('vtkMRMLMarkupsROINode')
    roi.SetCenterWorld(*(to_world @ ijk)[:3])
    roi.SetSize(8, 5, 7)
    where, block = volumes.region_block(reference, roi=roi)
    to_roi = np.linalg.inv(volumes._array(roi.GetObjectToWorldMatrix()))
    every = (np.abs((to_roi @ centres)[:3]) <= np.array([4, 2.5, 3.5])[:, None] + 1e-6).all(0).reshape(40, 50, 60)
    assert block.size < every.size / 20 and block.sum() == every.sum() > 0
    np.testing.assert_array_equal(volumes.roi_mask(reference, roi), every)
