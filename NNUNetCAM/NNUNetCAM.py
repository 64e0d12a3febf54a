"""NNUNetCAM: why did an nnU-Net v2 model segment what it did? Class Activation Maps over the scan.

Thin Slicer glue: the Module, the Widget (panel <-> parameter node <-> NNUNetCAMLib) and the Test. All logic lives in
NNUNetCAMLib, which has no Qt and is tested outside Slicer; the computation runs in nnunetv2_cam_core, in a
subprocess."""
import contextlib
import enum
import platform
import subprocess
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from NNUNetCAMLib import (COLORMAPS, DEFAULT_COLORMAP, DisplayOptions, NNUNetCAMLogic, PythonEnvironment,
                          excluded_requirements, install_requirements, layer_choices, missing_requirements, model_info,
                          target_classes, torch_install_arguments)
from NNUNetCAMLib import display, evaluation
from NNUNetCAMLib.logic import LAYER_TOOLTIP, stdout_json
from NNUNetCAMLib.process import run_to_end, stdout_of
from NNUNetCAMLib.server import ServerStartError, connect_server

PYTHON_SETTING = 'NNUNetCAM/python'  # '' = Slicer's own Python
SERVER_URL_SETTING = 'NNUNetCAM/serverUrl'
SERVER_TOKEN_FILE_SETTING = 'NNUNetCAM/serverTokenFile'  # the file's path; the token stays in memory


class ComputeOn(enum.Enum):
    """Where Apply computes. A saved scene holds the name (parameterNodeWrapper's EnumSerializer); the panel shows
    the label (its QComboBoxToEnumConnector calls label()), so a label can change without breaking old scenes."""
    local = 'this computer'
    process = 'a new process per run'
    server = 'a server'

    def label(self) -> str:
        return self.value


def savedEnvironment() -> PythonEnvironment:
    """The Python chosen in the panel, kept in the application settings."""
    python = qt.QSettings().value(PYTHON_SETTING) or ''
    return PythonEnvironment(python, slicer.util.startupEnvironment()) if python else PythonEnvironment()


class NNUNetCAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = 'NNUNetCAM'
        self.parent.categories = ['Segmentation']
        self.parent.contributors = ['NNUNetCAM developers']
        self.parent.helpText = (
            'Segment a scan with a trained nnU-Net v2 model and show <b>why</b>: a Class Activation Map (Grad-CAM '
            'and related methods) over the image, bright where the model looked to find the chosen class. '
            'Pick the volume and the model folder, click Apply. See the '
            '<a href="https://github.com/nnunetcam/SlicerNNUNetCAM#readme">README</a>.')
        self.parent.acknowledgementText = (
            'Uses nnU-Net v2 (Isensee et al.) and pytorch-grad-cam (Gildenblat et al.). Subprocess, progress and '
            'cancel follow SlicerNNUNet and SlicerMONAIAuto3DSeg.')


@parameterNodeWrapper
class NNUNetCAMParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    channel1Volume: slicer.vtkMRMLScalarVolumeNode
    channel2Volume: slicer.vtkMRMLScalarVolumeNode
    channel3Volume: slicer.vtkMRMLScalarVolumeNode
    modelFolder: str = ''
    targetClass: str = ''
    targetLayer: str = 'last_decoder'
    method: str = 'gradcam'
    device: Annotated[str, Choice(['auto', 'cuda', 'cpu'])] = 'auto'
    tta: bool = True
    evaluate: bool = False
    foldSpread: bool = False
    computeOn: ComputeOn = ComputeOn.local
    targetRoi: slicer.vtkMRMLMarkupsROINode
    targetPoint: slicer.vtkMRMLMarkupsFiducialNode
    pointRadiusMm: Annotated[float, WithinRange(1.0, 100.0)] = 10.0
    camVolume: slicer.vtkMRMLScalarVolumeNode
    colormap: Annotated[str, Choice(list(COLORMAPS))] = DEFAULT_COLORMAP
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    colorLegend: bool = True
    volumeRendering: bool = False


class NNUNetCAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._info = None
        self._foldBoxes = []
        self._run = None
        self._started = 0.0
        self._connection = None  # a remote server (Compute on: a server), after Connect
        self._remoteShown = False
        self._connectingGui = False  # the parameter node's connectors refill the combo boxes
        self._starting = False  # Apply is preparing a run (installing, starting the server): it waits

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath('UI/NNUNetCAM.ui'))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = NNUNetCAMLogic(scheduler=qt.QTimer.singleShot, temp_root=slicer.app.temporaryPath,
                                    volume_rendering_logic=slicer.modules.volumerendering.logic(),
                                    plots_logic=slicer.modules.plots.logic())
        self.ui.progressBar.hide()
        self.ui.methodComboBox.addItem('gradcam')

        self.ui.modelFolderPathLineEdit.connect('currentPathChanged(QString)', self.onModelFolderChanged)
        # ctkPathLineEdit emits currentPathChanged for acceptable (non-empty) text only: clearing it says so here
        self.ui.modelFolderPathLineEdit.connect('validInputChanged(bool)', self.onModelFolderValid)
        self.ui.targetClassComboBox.connect('currentTextChanged(QString)', self.onTargetClassChanged)
        self.ui.targetLayerComboBox.connect('currentIndexChanged(int)', self.onTargetLayerChanged)
        self.ui.methodComboBox.connect('currentTextChanged(QString)', self.onMethodChanged)
        self.ui.targetSegmentSelector.connect('currentNodeChanged(vtkMRMLNode*)', lambda node: self.updateApply())
        self.ui.targetSegmentSelector.connect('currentSegmentChanged(QString)', lambda segment: self.updateApply())
        self.ui.applyButton.connect('clicked(bool)', self.onApply)
        self.ui.camVolumeSelector.connect('currentNodeChanged(vtkMRMLNode*)', self.onDisplayChanged)
        self.ui.colormapComboBox.connect('currentTextChanged(QString)', self.onDisplayChanged)
        self.ui.thresholdSlider.connect('valueChanged(double)', self.onDisplayChanged)
        self.ui.opacitySlider.connect('valueChanged(double)', lambda v: display.set_overlay_opacity(slicer.mrmlScene, v))
        self.ui.colorLegendCheckBox.connect('toggled(bool)', self.onDisplayChanged)
        self.ui.volumeRenderingCheckBox.connect('toggled(bool)', self.onDisplayChanged)
        self.ui.slicerPythonRadioButton.connect('toggled(bool)', self.onEnvironmentChanged)
        self.ui.pythonPathLineEdit.connect('currentPathChanged(QString)', self.onEnvironmentChanged)
        self.ui.checkEnvironmentButton.connect('clicked(bool)', self.onCheckEnvironment)
        self.ui.installButton.connect('clicked(bool)', self.onInstall)
        self.ui.computeOnComboBox.connect('currentTextChanged(QString)', self.onComputeOnChanged)
        self.ui.connectServerButton.connect('clicked(bool)', self.onConnectServer)
        self.ui.serverModelComboBox.connect('currentTextChanged(QString)', self.onServerModelChanged)
        self.ui.serverUrlLineEdit.text = qt.QSettings().value(SERVER_URL_SETTING) or ''
        self.ui.serverTokenFilePathLineEdit.currentPath = qt.QSettings().value(SERVER_TOKEN_FILE_SETTING) or ''
        self._showServerWidgets(False)

        python = qt.QSettings().value(PYTHON_SETTING) or ''
        self.ui.customPythonRadioButton.setChecked(bool(python))
        self.ui.pythonPathLineEdit.currentPath = python
        self.onEnvironmentChanged()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.logic:
            self.logic.cancel()
            self.logic.cleanup()  # stops the local server

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApply)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ---
    def initializeParameterNode(self):
        holder = ScriptedLoadableModuleLogic()
        holder.moduleName = 'NNUNetCAM'  # the singleton parameter node is named after the module
        self.setParameterNode(NNUNetCAMParameterNode(holder.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass('vtkMRMLScalarVolumeNode')
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, node):
        if self._parameterNode and self._parameterNodeGuiTag is not None:  # else exit() has disconnected it
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApply)
        self._parameterNode = node
        if node:
            # a mapping: connectGui takes a widget, and returns the tag only from Slicer 5.10 on. The connectors
            # clear and refill the combo boxes without blocking their signals: the slots wait for the result
            self._connectingGui = True
            try:
                self._parameterNodeGuiTag = self._connectGui(node)
            finally:
                self._connectingGui = False
            self.onComputeOnChanged(self.ui.computeOnComboBox.currentText)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateApply)
            if node.modelFolder and node.modelFolder != self.ui.modelFolderPathLineEdit.currentPath:
                self.ui.modelFolderPathLineEdit.currentPath = node.modelFolder
        self.updateApply()

    def _connectGui(self, node):
        return node.connectParametersToGui({
                'inputVolume': self.ui.inputVolumeSelector, 'channel1Volume': self.ui.channel1Selector,
                'channel2Volume': self.ui.channel2Selector, 'channel3Volume': self.ui.channel3Selector,
                'device': self.ui.deviceComboBox, 'tta': self.ui.ttaCheckBox,
                'evaluate': self.ui.evaluateCheckBox, 'foldSpread': self.ui.foldSpreadCheckBox,
                'computeOn': self.ui.computeOnComboBox, 'targetRoi': self.ui.targetRoiSelector,
                'targetPoint': self.ui.targetPointSelector, 'pointRadiusMm': self.ui.pointRadiusSlider,
                'camVolume': self.ui.camVolumeSelector,
                'colormap': self.ui.colormapComboBox, 'opacity': self.ui.opacitySlider,
                'threshold': self.ui.thresholdSlider, 'colorLegend': self.ui.colorLegendCheckBox,
                'volumeRendering': self.ui.volumeRenderingCheckBox})

    # --- model folder: info now, layers and methods from the core in the background ---
    def remote(self) -> bool:
        return self.ui.computeOnComboBox.currentText == ComputeOn.server.label()

    def onModelFolderChanged(self, folder):
        if self.remote():
            return
        self._showModel(folder and (lambda: model_info(folder)))

    def onModelFolderValid(self, valid):
        """A cleared folder field: no model (Apply cannot run the previous one)."""
        if not valid and not self.remote():
            if self._parameterNode:
                self._parameterNode.modelFolder = ''
            self._showModel(None)

    def _showModel(self, describe):
        """The model's classes, channels, folds and layers in the panel; describe() gives its info (None: no model)."""
        self._info = None
        self.ui.targetClassComboBox.clear()
        self.ui.targetLayerComboBox.clear()
        for box in self._foldBoxes:
            box.deleteLater()
        self._foldBoxes = []
        if not describe:
            self.ui.modelInfoLabel.text = ''
            self.updateApply()
            return
        try:
            self._info = describe()
        except Exception as e:
            self.ui.modelInfoLabel.text = f'<span style="color:#c0392b">{e}</span>'
            self.updateApply()
            return
        info = self._info
        if len(info['channels']) > 1 + len(self._channelWidgets()):
            self._info = None
            self.ui.modelInfoLabel.text = (f'This model takes {len(info["channels"])} channels; the panel offers up to '
                                           f'{1 + len(self._channelWidgets())}. Use the scripting API '
                                           f'(channelVolumes=...).')
            self.updateApply()
            return
        if self._parameterNode and not self.remote():
            self._parameterNode.modelFolder = info['folder']
        if not self.remote():  # a folder that holds a model goes into the field's list of recent folders
            self.ui.modelFolderPathLineEdit.addCurrentPathToHistory()
        self.ui.modelInfoLabel.text = (
            f'{info["dataset"]}, {info["configuration"]}, folds {", ".join(map(str, info["folds"])) or "none"}; '
            f'{"regions" if info["regions"] else "classes"}: {", ".join(target_classes(info))}; '
            f'channels: {", ".join(info["channels"])}')
        wanted = self._parameterNode.targetClass if self._parameterNode else ''
        self.ui.targetClassComboBox.addItems(target_classes(info))
        if wanted in target_classes(info):
            self.ui.targetClassComboBox.currentText = wanted
        for i, (label, selector) in enumerate(self._channelWidgets(), start=1):
            shown = i < len(info['channels'])
            label.visible = selector.visible = shown
            if shown:
                label.text = f'{info["channels"][i]} (channel {i}):'
        self.ui.inputVolumeLabel.text = f'{info["channels"][0]} volume:'
        for fold in info['folds']:
            box = qt.QCheckBox(str(fold))
            box.checked = True
            box.connect('toggled(bool)', lambda checked: self.updateApply())
            self.ui.foldsLayout.addWidget(box)
            self._foldBoxes.append(box)
        combo = self.ui.targetLayerComboBox
        combo.blockSignals(True)  # keep the saved layer until the list arrives
        if self.remote():  # the network is on the server: the layers every model has; the saved one if it is one
            combo.addItem('last decoder stage', 'last_decoder')
            combo.addItem('bottleneck', 'bottleneck')
            combo.currentIndex = max(combo.findData(self._parameterNode.targetLayer if self._parameterNode else ''), 0)
            combo.toolTip = LAYER_TOOLTIP
        else:
            combo.addItem('last decoder stage (listing layers...)', 'last_decoder')
            folder = self.ui.modelFolderPathLineEdit.currentPath
            self.logic.callCore(['--list-layers', '-m', info['folder'], '-device', 'cpu', '--progress', 'json'],
                                lambda rc, events: self.onLayersListed(folder, rc, events))
        combo.blockSignals(False)
        if self.remote():
            self.onTargetLayerChanged(combo.currentIndex)
        if self.ui.methodComboBox.count == 1:
            self.logic.callCore(['--list-methods', '--progress', 'json'], self.onMethodsListed)
        self.updateApply()

    def _channelWidgets(self):
        return [(self.ui.channel1Label, self.ui.channel1Selector), (self.ui.channel2Label, self.ui.channel2Selector),
                (self.ui.channel3Label, self.ui.channel3Selector)]

    def onLayersListed(self, folder, rc, events):
        if folder != self.ui.modelFolderPathLineEdit.currentPath or self.remote():
            return
        combo = self.ui.targetLayerComboBox
        try:
            choices = layer_choices(stdout_json(rc, events))
        except RuntimeError as e:
            combo.setItemText(0, 'last decoder stage (layers could not be listed)')
            self.log(f'--list-layers: {e}')
            return
        wanted = self._parameterNode.targetLayer if self._parameterNode else 'last_decoder'
        combo.blockSignals(True)
        combo.clear()
        for name, text in choices:
            combo.addItem(text, name)
        index = combo.findData(wanted)
        combo.currentIndex = max(index, 0)  # the default comes first
        combo.toolTip = LAYER_TOOLTIP
        combo.blockSignals(False)

    def onMethodsListed(self, rc, events):
        try:
            methods = stdout_json(rc, events)
        except RuntimeError as e:
            self.log(f'--list-methods: {e}')
            return
        combo = self.ui.methodComboBox
        current = combo.currentText
        combo.blockSignals(True)
        combo.clear()
        for name, description in methods.items():
            combo.addItem(name)
            combo.setItemData(combo.count - 1, description, qt.Qt.ToolTipRole)
        combo.currentText = self._parameterNode.method if self._parameterNode else current
        combo.blockSignals(False)

    def onTargetClassChanged(self, text):
        if self._parameterNode and text:
            self._parameterNode.targetClass = text

    def onMethodChanged(self, text):
        if self._parameterNode and text:
            self._parameterNode.method = text

    def onTargetLayerChanged(self, index):
        name = self.ui.targetLayerComboBox.itemData(index)
        if self._parameterNode and name:
            self._parameterNode.targetLayer = name

    def selectedFolds(self):
        return [box.text for box in self._foldBoxes if box.checked]

    def updateApply(self, caller=None, event=None):
        running = self._run is not None and self._run.running
        p = self._parameterNode
        ready = bool(p and p.inputVolume and self._info and self.selectedFolds())
        local_only = bool(p and p.computeOn is ComputeOn.server and (p.evaluate or p.foldSpread))
        one_fold = bool(p and p.foldSpread and len(self.selectedFolds()) < 2)
        self.ui.applyButton.enabled = not self._starting and (running or (ready and not local_only and not one_fold))
        self.ui.applyButton.text = 'Cancel' if running else 'Starting...' if self._starting else 'Apply'
        self.ui.targetRuleLabel.text = self.targetRule()
        self.ui.applyButton.toolTip = ('Stop the run; nothing is added to the scene.' if running else
                                       'Preparing the run.' if self._starting else
                                       'The evaluation and the fold spread run on this computer: untick them, or '
                                       'compute on this computer.' if local_only else
                                       'The fold spread compares the folds\' maps: tick two folds or more, or untick '
                                       'Fold spread.' if one_fold else
                                       'Segment the volume and compute the CAM.' if ready else
                                       'Select an input volume, a model folder and at least one fold.')

    def targetRule(self) -> str:
        """Which of the chosen regions Apply explains: a segment over an ROI over a point."""
        p = self._parameterNode
        chosen = [name for name, on in (
            ('the segment', bool(self.ui.targetSegmentSelector.currentNode()
                                 and self.ui.targetSegmentSelector.currentSegmentID())),
            ('the ROI', bool(p and p.targetRoi)), ('the point', bool(p and p.targetPoint))) if on]
        if len(chosen) < 2:
            return 'One region is explained: the segment if one is chosen, else the ROI, else the point.'
        return f'{chosen[0][0].upper()}{chosen[0][1:]} is explained; {" and ".join(chosen[1:])} ignored.'

    # --- compute on a server ---
    def _showServerWidgets(self, remote: bool):
        for w in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.serverTokenFileLabel,
                  self.ui.serverTokenFilePathLineEdit, self.ui.connectServerButton, self.ui.serverModelLabel,
                  self.ui.serverModelComboBox):
            w.visible = remote
        self.ui.modelFolderLabel.visible = self.ui.modelFolderPathLineEdit.visible = not remote

    def onComputeOnChanged(self, text):
        """Only a switch between a model folder and a server's model changes the model. The parameter node's
        connector clears and refills the list on every enter(), passing through the first item: ignored, and the
        mode it leaves is applied once afterwards (setParameterNode)."""
        remote = text == ComputeOn.server.label()
        if self._connectingGui or not text or remote == self._remoteShown:
            return
        self._remoteShown = remote
        self._showServerWidgets(remote)
        if remote:
            self.ui.serverStatusLabel.text = f'Server: {self._connection.url}' if self._connection else \
                'Give the server\'s URL and token file, then Connect.'
            self.onServerModelChanged(self.ui.serverModelComboBox.currentText)
        else:
            self.ui.serverStatusLabel.text = ''
            self.onModelFolderChanged(self.ui.modelFolderPathLineEdit.currentPath)

    def onConnectServer(self):
        with slicer.util.tryWithErrorDisplay('Failed to connect to the server.'):
            url, tokenFile = self.ui.serverUrlLineEdit.text, self.ui.serverTokenFilePathLineEdit.currentPath
            self._connection = None
            self.ui.serverModelComboBox.clear()
            self.ui.connectServerButton.enabled = False  # WaitCursor processes events: no second click meanwhile
            try:
                with slicer.util.WaitCursor():
                    connection = connect_server(url, tokenFile)
                    models = connection.models()
            except Exception as e:
                self.ui.serverStatusLabel.text = f'<span style="color:#c0392b">Not connected: {e}</span>'
                return
            finally:
                self.ui.connectServerButton.enabled = True
            qt.QSettings().setValue(SERVER_URL_SETTING, url.strip())
            qt.QSettings().setValue(SERVER_TOKEN_FILE_SETTING, tokenFile)
            self._connection = connection
            self.ui.serverStatusLabel.text = f'Server: {connection.status()}'
            self.ui.serverModelComboBox.addItems(models)
            if not models:
                self.ui.modelInfoLabel.text = 'The server serves no model (its --models folders hold none).'

    def onServerModelChanged(self, model):
        if not self.remote():
            return
        connection = self._connection
        self._showModel(connection and model and (lambda: connection.model_info(model)))

    # --- run ---
    def onApply(self):
        with slicer.util.tryWithErrorDisplay('Failed to run NNUNetCAM.'):
            if self._run is not None and self._run.running:
                self._run.cancel()
                self.ui.statusLabel.text = 'Cancelled; nothing was added to the scene.'
                self.ui.progressBar.hide()
                self.updateApply()
                return
            if self._starting:
                return
            # installing and starting a server process events: no second Apply meanwhile
            self._starting = True
            self.updateApply()
            try:
                self._apply()
            finally:
                self._starting = False
                self.updateApply()

    def _apply(self):
        p = self._parameterNode
        remote = p.computeOn is ComputeOn.server
        if not remote and not self.ensureEnvironment():  # a remote server needs nothing on this computer
            return
        channels = [p.channel1Volume, p.channel2Volume, p.channel3Volume][:len(self._info['channels']) - 1]
        segmentation = self.ui.targetSegmentSelector.currentNode()
        segmentId = self.ui.targetSegmentSelector.currentSegmentID() if segmentation else None
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._started = time.monotonic()
        # the evaluation and the fold spread run in a process of their own
        server = self._connection if remote else \
            'local' if p.computeOn is ComputeOn.local and not (p.evaluate or p.foldSpread) else None
        model = self.ui.serverModelComboBox.currentText if remote else self._info['folder']
        run = lambda server: self.logic.run(  # noqa: E731
            p.inputVolume, model, targetClass=self.ui.targetClassComboBox.currentText,
            method=p.method, layers=[p.targetLayer], folds=self.selectedFolds(), device=p.device, tta=p.tta,
            channelVolumes=channels, targetSegmentation=segmentation if segmentId else None,
            targetSegmentId=segmentId, targetRoi=p.targetRoi if not segmentId else None,
            targetPoint=p.targetPoint if not (segmentId or p.targetRoi) else None, pointRadiusMm=p.pointRadiusMm,
            displayOptions=DisplayOptions(p.colormap, p.threshold, p.opacity, p.colorLegend, p.volumeRendering),
            evaluate=p.evaluate, foldSpread=p.foldSpread, server=server, wait=False, onProgress=self.onProgress,
            onLog=self.log, onFinished=self.onFinished, onError=self.onError)
        try:
            if server == 'local':
                server = self._localServer()
            try:
                self._run = run(server)
            except ServerStartError as e:  # e.g. a port or permission problem
                self.log(f'{e}; running in a new process instead')
                self.ui.serverStatusLabel.text = f'Server not started: {e}'
                self._run = run(None)
        except Exception as e:
            self.ui.progressBar.hide()
            slicer.util.errorDisplay(str(e), windowTitle='NNUNetCAM')
            return
        self.log(' '.join(self._run.log[:1]))

    def _localServer(self):
        """'local' when the server on this computer can run (its packages there, or installed now), else None with
        one log line saying why. No network call: a server that died is started again by the logic."""
        why = self.localServerUnavailable()
        if why:
            self.log(f'{why}; running in a new process instead')
            self.ui.serverStatusLabel.text = f'Server not started: {why}'
            return None
        server = self.logic.localServer
        if server.process is not None and server.process.returncode is not None:
            self.log('The server on this computer had stopped; starting it again')
        if server.connection is None or server.process.returncode is not None:
            self.ui.serverStatusLabel.text = 'Starting the server on this computer...'
        return 'local'

    def localServerUnavailable(self) -> str:
        """Why the server cannot run in Slicer's Python ('' when it can). Its packages are installed when it is
        first used, where they install, after the user agrees. Another Python: the user set it up."""
        if not self.logic.environment.is_slicer_python:
            return ''
        excluded = excluded_requirements(self.serverRequirementsFile())
        if excluded:
            names = ', '.join(line.split(';')[0].strip() for line in excluded)
            return (f'the server on this computer needs {names}, which do not install in Python '
                    f'{platform.python_version()} (Slicer 5.10 or later)')
        missing = missing_requirements(self.serverRequirementsFile())
        if not missing:
            return ''
        if not slicer.util.confirmOkCancelDisplay(
                'A server on this computer keeps the model and the scan loaded between runs, so another class or '
                'region takes seconds. It needs these Python packages in Slicer:\n  ' + '\n  '.join(missing)
                + '\n\nInstall them now (a few MB)? Cancel runs a new process per run.', windowTitle='NNUNetCAM'):
            return 'its packages are not installed'
        return '' if self.install(missing) else 'its packages could not be installed'

    def onProgress(self, fraction, text):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text

    def log(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def onFinished(self, result):
        self.ui.progressBar.hide()
        sanity = evaluation.sanity_lines(result.sidecar)
        held = ' (case already on the server)' if getattr(self._run.process, 'held', False) else ''
        self.ui.statusLabel.text = (f'Done in {time.monotonic() - self._started:.0f} s{held}: '
                                    f'{", ".join(node.GetName() for node in result.nodes())}'
                                    + ''.join(f'\n{line}' for line in sanity))
        self._parameterNode.camVolume = next(iter(result.cams.values()))
        status = getattr(self._run.process, 'status', None)  # asked by the run's own thread, not here
        if 'server' in result.sidecar and status:
            self.ui.serverStatusLabel.text = f'Server: {status}'
        self.updateApply()

    def onError(self, message):
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = 'Failed; see the log.'
        self.updateApply()
        slicer.util.errorDisplay(message, windowTitle='NNUNetCAM', detailedText='\n'.join(self._run.log))

    def onDisplayChanged(self, *args):
        """Read from the widgets: the parameter node may be updated after this slot runs."""
        with slicer.util.tryWithErrorDisplay('Failed to update the display of the map.'):
            cam, background = self.ui.camVolumeSelector.currentNode(), self.ui.inputVolumeSelector.currentNode()
            colormap = self.ui.colormapComboBox.currentText  # '' while the parameter node's connector refills the list
            if not cam or not background or not cam.GetDisplayNode() or colormap not in COLORMAPS:
                return
            threshold = self.ui.thresholdSlider.value
            display.style_cam(slicer.mrmlScene, cam, colormap, threshold)
            display.show_in_slice_views(slicer.mrmlScene, background, cam, self.ui.opacitySlider.value)
            legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(cam)
            if legend:
                legend.SetVisibility(self.ui.colorLegendCheckBox.checked)
            elif self.ui.colorLegendCheckBox.checked:
                display.add_color_legend(cam, cam.GetName())
            volumeRendering = slicer.modules.volumerendering.logic()
            rendering = volumeRendering.GetFirstVolumeRenderingDisplayNode(cam)
            if self.ui.volumeRenderingCheckBox.checked:
                display.show_volume_rendering(slicer.mrmlScene, cam, volumeRendering, threshold)
            elif rendering:
                rendering.SetVisibility(False)

    # --- Python environment ---
    def environment(self):
        if self.ui.slicerPythonRadioButton.checked:
            return PythonEnvironment()
        return PythonEnvironment(self.ui.pythonPathLineEdit.currentPath, slicer.util.startupEnvironment())

    def onEnvironmentChanged(self, *args):
        custom = self.ui.customPythonRadioButton.checked
        self.ui.pythonPathLineEdit.enabled = custom
        self.ui.installButton.visible = not custom
        qt.QSettings().setValue(PYTHON_SETTING, self.ui.pythonPathLineEdit.currentPath if custom else '')
        if self.logic:
            self.logic.environment = self.environment()
        self.ui.environmentStatusLabel.text = f'Using {self.logic.environment.describe()}; not checked yet.'

    def onCheckEnvironment(self):
        with slicer.util.tryWithErrorDisplay('Failed to check the Python environment.'):
            env = self.logic.environment
            self.ui.environmentStatusLabel.text = f'Checking {env.describe()}...'
            self.logic.callCore(['check-env'], lambda rc, events: self._showCheck(env.parse_check(rc, events)))

    def _showCheck(self, info):
        color = '#27ae60' if info['ok'] else '#c0392b'
        self.ui.environmentStatusLabel.text = f'<span style="color:{color}">{info["message"]}</span>'

    def requirementsFile(self):
        return self.resourcePath('requirements.txt')

    def serverRequirementsFile(self):
        return self.resourcePath('server-requirements.txt')

    def ensureEnvironment(self):
        """Slicer's Python: offer to install what the core needs. Another Python: the user set it up."""
        if not self.logic.environment.is_slicer_python:
            return True
        missing = missing_requirements(self.requirementsFile())
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                'NNUNetCAM needs these Python packages in Slicer:\n  ' + '\n  '.join(missing)
                + '\n\nInstall them now? This downloads several GB (PyTorch) and can take minutes. Packages '
                  'that Slicer ships are not changed.', windowTitle='NNUNetCAM'):
            return False
        return self.onInstall()

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay('Failed to install the requirements.'):
            missing = missing_requirements(self.requirementsFile())
            if not missing:
                self.ui.environmentStatusLabel.text = "Slicer's Python has everything NNUNetCAM needs."
                return True
            if not self.install(missing):
                return False
            self.ui.environmentStatusLabel.text = "Requirements installed in Slicer's Python."
            return True

    def install(self, missing):
        """Install requirement lines in Slicer's Python: torch with the PyTorch extension when present, the rest
        with pip. False (the error shown) when it failed."""
        installTorch = None
        try:
            import PyTorchUtils

            def installTorch(lines):
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, **torch_install_arguments(lines))
        except ImportError:
            self.log('PyTorch extension not found: installing torch with pip (CPU or default CUDA build)')
        try:
            from slicer.packaging import pip_install  # Slicer after 5.10: shows progress and errors in its own dialogs
            slicerDialogs = True
        except ImportError:
            pip_install, slicerDialogs = slicer.util.pip_install, False
        try:
            with contextlib.nullcontext() if slicerDialogs else slicer.util.WaitCursor():
                install_requirements(missing, pip_install, installTorch, log=self.log)
        except Exception as e:
            if not (slicerDialogs and isinstance(e, subprocess.CalledProcessError)):  # else Slicer has shown pip's log
                slicer.util.errorDisplay(f'Installing the requirements failed: {e}', windowTitle='NNUNetCAM')
            return False
        return True


class NNUNetCAMTest(ScriptedLoadableModuleTest):
    """End to end on the tiny demo model (built on first use, a few minutes on CPU) in the Python chosen in the
    panel: run, then check the nodes and that the CAM sits on the input's voxel grid exactly. Slicer's events are
    processed while it waits."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_run_and_geometry()

    def test_run_and_geometry(self):
        import numpy as np
        from NNUNetCAMLib.volumes import ijk_to_ras
        logic = NNUNetCAMLogic(environment=savedEnvironment())
        env = logic.environment
        check = env.check(event_pump=logic.event_pump)
        if not check['ok']:  # no skipTest: Reload and Test calls runTest() directly and would report a failure
            self.delayDisplay(f'Test not run: {check["message"]}')
            return
        self.delayDisplay('Building (or finding) the tiny demo model')
        code = ('import sys; from pathlib import Path; from nnunetv2_cam_core.demo import build_tiny_models, '
                'default_cache, model_folder, write_sample_case; r = build_tiny_models(default_cache()); '
                'print(model_folder(r)); print(write_sample_case(Path(sys.argv[1])))')
        rc, events = run_to_end([env.executable, '-c', code, slicer.app.temporaryPath], env.env(), 3600,
                                logic.event_pump)
        self.assertEqual(rc, 0, '\n'.join(e.get('message', '') for e in events[-5:]))
        model, case = stdout_of(events).splitlines()[-2:]
        volume = slicer.util.loadVolume(case)
        self.delayDisplay('Running NNUNetCAM')
        result = logic.run(volume, model, targetClass='lesion', layers=['last_decoder'], folds=[0], device='cpu',
                           tta=False)
        cam = result.cams['lesion']
        self.assertEqual(cam.GetName(), f'{volume.GetName()} CAM lesion gradcam')
        self.assertLess(np.abs(ijk_to_ras(cam) - ijk_to_ras(volume)).max(), 1e-4)
        values = slicer.util.arrayFromVolume(cam)
        self.assertAlmostEqual(float(values.max()), 1.0, places=4)
        names = [result.segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(result.segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertIn('lesion', names)
        self.delayDisplay('Test passed')
