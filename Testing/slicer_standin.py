"""The Slicer app around NNUNetCAM.py, on real Qt: PyQt5 5.15 (the Qt of Slicer 5.8 and main), offscreen, with a real
event loop. Only what the `slicer-core` wheel lacks is emulated, each piece after the source named beside it
(Slicer v5.8.0 / main, CTK at the commits they pin: 82cae578 / 5056664a). Nothing of their code is copied.
- PythonQt: Qt properties as attributes (`w.enabled = False`), `obj.connect('signal(args)', slot)` by exact
  signature, a slot called with as many arguments as it takes, an exception in a slot printed while the caller goes
  on (collected in App.slotErrors), `qt.QTimer.singleShot(ms, callable)`.
- CTK / qMRML widgets of the .ui as subclasses of real Qt widgets: ctkPathLineEdit (acceptable text, history),
  ctkSliderWidget, ctkCollapsibleButton, qMRMLWidget, qMRMLNodeComboBox (type filter, None item, auto-select on a real
  QComboBox), qMRMLSegmentSelectorWidget (the segments of the real segmentation node).
- slicer.util.loadUI with PyQt5.uic (tooltips, enabled, nodeTypes, noneEnabled, settingKey kept); the dialogs,
  answered from App.answers; slicer.app.processEvents running Qt's event loop. slicer.util.tryWithErrorDisplay is
  the wheel's own (Base/Python/slicer/util.py, the same code at v5.8.0:3278-3320 and main:3691-3733): it shows an
  error through the errorDisplay below (util's global) unless App.testingEnabled(), then raises it again.
- parameterNodeWrapper: connectors and validators of Base/Python/slicer/parameterNodeWrapper/.
- ScriptedLoadableModule.py: the module, widget, logic (singleton parameter node) and test base classes.
5.8 and main are modelled where they differ: connectGui's tag, disconnectGui's observer, slicer.packaging."""
import enum
import inspect
import io
import json
import os
import re
import sys
import time
import traceback
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault('QT_QPA_PLATFORM', 'offscreen')
from PyQt5 import QtCore, QtGui, QtWidgets  # noqa: E402
from PyQt5.QtCore import pyqtProperty, pyqtSignal  # noqa: E402
from PyQt5.uic.Loader.qobjectcreator import LoaderCreatorPolicy  # noqa: E402
from PyQt5.uic.uiparser import UIParser  # noqa: E402

import vtk  # noqa: E402

import slicer  # noqa: E402

MODULE = Path(__file__).resolve().parent.parent / 'NNUNetCAM'
QAPP = QtWidgets.QApplication.instance() or QtWidgets.QApplication(['SlicerStandIn'])
APP = None  # the App of the installed stand-ins
VERSION = 'main'


class App:
    """slicer.app over the QApplication, and what the stand-ins record."""

    def __init__(self, temporaryPath: str, version: str):
        self.temporaryPath, self.version = temporaryPath, version
        self.applicationName = 'Slicer'
        self.events = 0
        self.slotErrors = []
        self.pending = 0  # qt.QTimer.singleShot callbacks not run yet
        self.connections = []  # (parameter node wrapper, mapping) of every connectParametersToGui
        self.dialogs = []  # (kind, text) of errorDisplay, confirmOkCancelDisplay, delayDisplay, pip
        self.answers = []  # what the user answers to the next confirmation dialogs (True: OK); none queued: an error
        self.waitCursors = 0
        self.pipError = None  # raised by pip_install

    def processEvents(self):
        """qSlicerCoreApplication is a QApplication: its processEvents runs queued events, timers and clicks."""
        self.events += 1
        QAPP.processEvents()

    def testingEnabled(self):
        return False  # as the app a radiologist runs: dialogs show (util.py v5.8.0:3060, main:3440)

    def setOverrideCursor(self, cursor):
        QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        QtWidgets.QApplication.restoreOverrideCursor()

    @property
    def settings(self):
        return _Settings()

    def runPending(self, seconds: float = 120):
        """Run Qt's event loop until every scheduled call has run (or fail after `seconds`)."""
        waitFor(lambda: self.pending == 0, seconds)
        assert self.pending == 0, 'scheduled calls still pending'


class _Settings(dict):
    """The application settings as a dict; setting an item writes it to QSettings."""

    def __init__(self):
        s = QtCore.QSettings()
        super().__init__({k: s.value(k) for k in s.allKeys()})

    def __setitem__(self, key, value):
        QtCore.QSettings().setValue(key, value)
        super().__setitem__(key, value)


def waitFor(condition, seconds: float = 60):
    """Run the event loop (timers, queued clicks) until condition() holds or the time is up; condition()'s value."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        QAPP.processEvents(QtCore.QEventLoop.AllEvents, 20)
        time.sleep(0.01)
    return condition()


# --- PythonQt over PyQt5 ---
# PythonQt (commontk/PythonQt, src/PythonQtInstanceWrapper.cpp, PythonQtInstanceWrapper_getattro/setattro) reads and
# writes a Qt property as an attribute before looking at methods of the same name: `label.text` is the text.
_PROPERTIES = {}
_UIC = []  # non-empty while uic builds a .ui: it calls objectName(), sizePolicy() ... as the C++ methods
# C++ argument types of Slicer's signals, as PyQt registers a Python object argument
_PYQT_TYPES = {'vtkMRMLNode*': 'PyQt_PyObject', 'vtkMRMLScene*': 'PyQt_PyObject', 'vtkObject*': 'PyQt_PyObject'}


def _properties(cls):
    if cls not in _PROPERTIES:
        meta = cls.staticMetaObject
        _PROPERTIES[cls] = {meta.property(i).name() for i in range(meta.propertyCount())}
    return _PROPERTIES[cls]


def _call(slot, args):
    """A PythonQt slot call: as many arguments as the slot takes; an exception is printed and recorded, the signal's
    emitter goes on (PythonQtSignalReceiver::invokePythonCallable, PythonQtSignalReceiver.cpp)."""
    try:
        params = inspect.signature(slot).parameters.values()
        if not any(p.kind == p.VAR_POSITIONAL for p in params):
            args = args[:sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)]
    except (TypeError, ValueError):
        pass
    try:
        slot(*args)
    except Exception as e:
        traceback.print_exc()
        if APP is not None:
            APP.slotErrors.append(e)


class PythonQtObject:
    """Mixed into every Qt class the module sees."""

    def __getattribute__(self, name):
        if _UIC:
            return super().__getattribute__(name)
        if name == 'name':  # PythonQt's alias of objectName, which slicer.util.childWidgetVariables reads
            return QtCore.QObject.objectName(self)
        if name in _properties(type(self)):
            return QtCore.QObject.property(self, name)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if not _UIC and name in _properties(type(self)):
            if not QtCore.QObject.setProperty(self, name, value):
                raise TypeError(f'{type(self).__name__}.{name} cannot be set to {value!r}')
            return
        super().__setattr__(name, value)

    def __bool__(self):
        """A PythonQt wrapper is true while its object lives (PyQt's QComboBox would be false with no items)."""
        return True

    def connect(self, signature, slot):
        """PythonQt's QObject.connect('signal(args)', callable): the exact signature, or no connection."""
        name, args = re.fullmatch(r'(\w+)\((.*)\)', signature.replace(' ', '')).groups()
        normalized = f'{name}({",".join(_PYQT_TYPES.get(a, a) for a in args.split(",") if a)})'
        if self.metaObject().indexOfSignal(QtCore.QMetaObject.normalizedSignature(normalized).data().decode()) < 0:
            raise AttributeError(f'{type(self).__name__} has no signal {signature}')
        signal = super().__getattribute__(name)
        if args:
            signal = signal[tuple(object if a in _PYQT_TYPES else a for a in args.split(','))]
        signal.connect(lambda *a: _call(slot, a))
        return True


_WRAPPED = {}


def pythonqt(cls):
    """cls with PythonQt's attribute rules (one class per Qt class)."""
    if cls not in _WRAPPED:
        _WRAPPED[cls] = type(cls.__name__, (PythonQtObject, cls), {})
    return _WRAPPED[cls]


class _QtModule(types.ModuleType):
    """The `qt` module: every Qt class, QObjects with PythonQt's attribute rules."""

    def __getattr__(self, name):
        for module in (QtWidgets, QtGui, QtCore):
            cls = getattr(module, name, None)
            if cls is not None:
                return pythonqt(cls) if isinstance(cls, type) and issubclass(cls, QtCore.QObject) else cls
        raise AttributeError(f'module qt has no attribute {name}')


class QTimer(PythonQtObject, QtCore.QTimer):
    @staticmethod
    def singleShot(ms, callback):
        """PythonQt's QTimer.singleShot(msec, callable) (PythonQtStdDecorators.cpp): the callable runs in Qt's event
        loop after msec, on the main thread."""
        app = APP  # the app of the test that scheduled it: a timer left by an earlier test counts there
        app.pending += 1

        def fire():
            app.pending -= 1
            _call(callback, ())
        QtCore.QTimer.singleShot(ms, fire)


class QApplication(PythonQtObject, QtWidgets.QApplication):
    @staticmethod
    def setOverrideCursor(cursor):
        """Counted: slicer.util.WaitCursor (util.py v5.8.0:3183, main:3596) sets it and processes events."""
        APP.waitCursors += 1
        QtWidgets.QApplication.setOverrideCursor(cursor)


class QSettings(QtCore.QSettings):
    """Slicer's settings: an ini file per test (install() points Qt at it)."""

    def value(self, key, default=None):
        return super().value(key, default)


# --- CTK widgets ---
class ctkCollapsibleButton(PythonQtObject, QtWidgets.QGroupBox):
    """A titled container (CTK Libs/Widgets/ctkCollapsibleButton.h:48 at 82cae578 and 5056664a: the `collapsed`
    property; `text` is the title)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def getText(self):
        return self.title()

    def setText(self, text):
        self.setTitle(text)

    def getCollapsed(self):
        return self._collapsed

    def setCollapsed(self, collapsed):
        self._collapsed = collapsed
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not collapsed)

    text = pyqtProperty(str, getText, setText)
    collapsed = pyqtProperty(bool, getCollapsed, setCollapsed)


class ctkPathLineEdit(PythonQtObject, QtWidgets.QWidget):
    """CTK Libs/Widgets/ctkPathLineEdit.cpp (82cae578 / 5056664a):
    - an editable QComboBox of recent paths whose line edit has a validator: with no name filters, `.+` (line 373 /
      280, updateFilter 477 / 388, Libs/Core/ctkUtils.cpp nameFiltersToRegExp: pattern '.+'), so '' is not acceptable;
    - currentPathChanged only when the text is acceptable (updateHasValidInput, 819-834 / 730-745): clearing the field
      emits nothing;
    - the history is written only by addCurrentPathToHistory (730 / 641), into QSettings under
      'ctkPathLineEdit/' + settingKey; retrieveHistory (694 / 605) fills the list and, with no current path, shows
      the most recent one (setCurrentIndex(0), 720 / 631); setSettingKey retrieves it."""
    Dirs, AllDirs, Files, Drives, NoSymLinks, AllEntries = 0x1, 0x400, 0x2, 0x4, 0x8, 0x7
    Readable, Writable, Executable, Modified, Hidden, System = 0x10, 0x20, 0x40, 0x80, 0x100, 0x200
    NoDot, NoDotDot, NoDotAndDotDot, CaseSensitive = 0x2000, 0x4000, 0x6000, 0x800
    MaxHistory = 5  # ctkPathLineEditPrivate::sMaxHistory

    currentPathChanged = pyqtSignal(str)
    validInputChanged = pyqtSignal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._filters, self._settingKey, self._valid = self.AllEntries | self.NoDotAndDotDot | self.Readable, '', False
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._combo = QtWidgets.QComboBox(self)
        self._combo.setEditable(True)
        self._combo.setInsertPolicy(QtWidgets.QComboBox.NoInsert)
        self._edit = self._combo.lineEdit()
        self._edit.setValidator(QtGui.QRegExpValidator(QtCore.QRegExp('.+'), self))
        browse = QtWidgets.QToolButton(self)
        browse.setText('...')
        layout.addWidget(self._combo, 1)
        layout.addWidget(browse)
        self._edit.textChanged.connect(self._updateHasValidInput)

    def _updateHasValidInput(self, text):
        was, self._valid = self._valid, self._edit.hasAcceptableInput()
        if self._valid:
            self.currentPathChanged.emit(self.getCurrentPath())
        if self._valid != was:
            self.validInputChanged.emit(self._valid)

    def getCurrentPath(self):
        return self._edit.text()

    def setCurrentPath(self, path):
        self._edit.setText(path)

    def comboBox(self):
        return self._combo

    def _key(self):
        return 'ctkPathLineEdit/' + (self._settingKey or self.objectName())

    def retrieveHistory(self):
        path = self.getCurrentPath()
        was = self.blockSignals(True)
        self._combo.clear()
        for p in (QtCore.QSettings().value(self._key(), [], type=list) or [])[:self.MaxHistory]:
            self._combo.addItem(p)
        if not path:
            self.blockSignals(was)
            self._combo.setCurrentIndex(0)
        else:
            self.setCurrentPath(path)
            self.blockSignals(was)

    def addCurrentPathToHistory(self):
        path = self.getCurrentPath()
        if not path:
            return
        settings = QtCore.QSettings()
        history = [p for p in (settings.value(self._key(), [], type=list) or []) if p != path]
        settings.setValue(self._key(), [path, *history])
        index = self._combo.findText(path)
        if index >= 0:
            self._combo.removeItem(index)
        while self._combo.count() >= self.MaxHistory:
            self._combo.removeItem(self._combo.count() - 1)
        self._combo.insertItem(0, path)
        self._combo.setCurrentIndex(0)

    def history(self):
        return [self._combo.itemText(i) for i in range(self._combo.count())]

    def getSettingKey(self):
        return self._settingKey

    def setSettingKey(self, key):
        self._settingKey = key
        self.retrieveHistory()

    def getFilters(self):
        return self._filters

    def setFilters(self, filters):
        self._filters = int(filters)

    currentPath = pyqtProperty(str, getCurrentPath, setCurrentPath)
    settingKey = pyqtProperty(str, getSettingKey, setSettingKey)
    filters = pyqtProperty(int, getFilters, setFilters)


class ctkSliderWidget(PythonQtObject, QtWidgets.QDoubleSpinBox):
    """CTK Libs/Widgets/ctkSliderWidget.cpp (82cae578 / 5056664a): value, minimum, maximum, decimals, singleStep and
    valueChanged(double) of its ctkDoubleSpinBox; setValue (297 / 305) and setMinimum/setRange (212, 248 / 220, 256)
    clamp the value into the range and round it to the decimals, emitting valueChanged when it changes."""


# --- qMRML widgets ---
class qMRMLWidget(PythonQtObject, QtWidgets.QWidget):
    """Libs/MRML/Widgets/qMRMLWidget.h: mrmlSceneChanged(vtkMRMLScene*) and setMRMLScene."""
    mrmlSceneChanged = pyqtSignal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(PythonQtObject, QtWidgets.QWidget):
    """Libs/MRML/Widgets/qMRMLNodeComboBox.cxx (v5.8.0 / main), on a real QComboBox of the scene's nodes:
    - the nodes listed: of a type in nodeTypes (IsA; a subclass only with showChildNodeTypes) and not
      HideFromEditors (qMRMLSortFilterProxyModel.cxx 234-280 / 232-277);
    - 'None' first when noneEnabled; without it the QComboBox selects the first node as nodes arrive (Qt's
      QComboBoxPrivate::_q_rowsInserted), so a node is auto-selected;
    - setCurrentNode of a node not listed selects None (or nothing) (setCurrentNodeID 915 / 889);
    - currentNodeChanged(vtkMRMLNode*) from the QComboBox's index change (emitCurrentNodeChanged 752 / 719);
    - without a scene the combo box is disabled (setMRMLScene, 821-893 / 790-867: setEnabled(scene != nullptr))."""
    currentNodeChanged = pyqtSignal(object)
    currentNodeIDChanged = pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._types, self._none, self._hidden, self._scene, self._tags = [], False, False, None, []
        self._add = self._remove = self._children = True
        self._combo = QtWidgets.QComboBox(self)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._combo)
        self._combo.currentIndexChanged.connect(self._emitCurrentNodeChanged)
        self.setEnabled(False)

    def _listed(self, node):
        return any(node.IsA(t) and (self._children or node.GetClassName() == t) for t in self._types) and \
            (self._hidden or not node.GetHideFromEditors())

    def _sync(self, *args):
        """The QComboBox's items follow the scene (qMRMLSceneModel), keeping the current item where it stays."""
        scene = self._scene
        nodes = [] if scene is None else [n for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
                                          if self._listed(n)]
        wanted = ([('None', '')] if self._none else []) + [(n.GetName(), n.GetID()) for n in nodes]
        have = [(self._combo.itemText(i), self._combo.itemData(i)) for i in range(self._combo.count())]
        if [w[1] for w in wanted] == [h[1] for h in have]:
            for i, (text, _) in enumerate(wanted):
                self._combo.setItemText(i, text)
            return
        for i in reversed(range(len(have))):  # removed nodes first: Qt moves the selection as rows go
            if have[i][1] not in {w[1] for w in wanted}:
                self._combo.removeItem(i)
        for i, (text, node_id) in enumerate(wanted):
            if self._combo.findData(node_id) < 0:
                self._combo.insertItem(i, text, node_id)

    def _emitCurrentNodeChanged(self, index):
        node = self.currentNode()
        self.currentNodeChanged.emit(node)
        self.currentNodeIDChanged.emit(node.GetID() if node else '')

    def setMRMLScene(self, scene):
        if scene is self._scene:
            return
        if self._scene is not None:
            for tag in self._tags:
                self._scene.RemoveObserver(tag)
        self._scene, self._tags = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent, scene.EndImportEvent,
                          scene.EndBatchProcessEvent):
                self._tags.append(scene.AddObserver(event, self._sync))
        self._sync()
        self.setEnabled(scene is not None)

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        node_id = self._combo.currentData()
        return self._scene.GetNodeByID(node_id) if node_id and self._scene is not None else None

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node else ''

    def setCurrentNode(self, node):
        self.setCurrentNodeID(node.GetID() if node is not None else '')

    def setCurrentNodeID(self, node_id):
        index = self._combo.findData(node_id) if node_id else -1
        self._combo.setCurrentIndex(index if index >= 0 else 0 if self._none else -1)

    def nodeCount(self):
        return self._combo.count() - (1 if self._none else 0)

    def getNodeTypes(self):
        return list(self._types)

    def setNodeTypes(self, types_):
        self._types = list(types_)
        self._sync()

    def getNoneEnabled(self):
        return self._none

    def setNoneEnabled(self, enabled):
        if enabled != self._none:
            self._none = enabled
            if enabled:
                self._combo.insertItem(0, 'None', '')
            else:
                self._combo.removeItem(self._combo.findData(''))

    def setAddEnabled(self, v):
        self._add = v

    def setRemoveEnabled(self, v):
        self._remove = v

    def setShowChildNodeTypes(self, v):
        self._children = v
        self._sync()

    def setShowHidden(self, v):
        self._hidden = v
        self._sync()

    nodeTypes = pyqtProperty('QStringList', getNodeTypes, setNodeTypes)
    noneEnabled = pyqtProperty(bool, getNoneEnabled, setNoneEnabled)
    addEnabled = pyqtProperty(bool, lambda self: self._add, setAddEnabled)
    removeEnabled = pyqtProperty(bool, lambda self: self._remove, setRemoveEnabled)
    showChildNodeTypes = pyqtProperty(bool, lambda self: self._children, setShowChildNodeTypes)
    showHidden = pyqtProperty(bool, lambda self: self._hidden, setShowHidden)


class qMRMLSegmentSelectorWidget(qMRMLWidget):
    """Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx (v5.8.0 / main): a segmentation node combo box and a
    segment combo box of that node's segments (populateSegmentCombobox 181 / 171), 'None' first when noneEnabled and
    then the first segment selected (279 / 269); currentSegmentID() the selected segment's ID (332 / 322);
    currentNodeChanged(vtkMRMLNode*) forwarded from the node combo box."""
    currentNodeChanged = pyqtSignal(object)
    currentSegmentChanged = pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._nodes = qMRMLNodeComboBox(self)
        self._nodes.setNodeTypes(['vtkMRMLSegmentationNode'])
        self._segments = QtWidgets.QComboBox(self)
        self._segmentId = ''
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._nodes)
        layout.addWidget(self._segments)
        self._nodes.currentNodeChanged.connect(self._onCurrentNodeChanged)
        self._segments.currentIndexChanged.connect(self._onCurrentSegmentChanged)
        self.mrmlSceneChanged.connect(self._nodes.setMRMLScene)

    def _onCurrentNodeChanged(self, node):
        self._populate()
        self.currentNodeChanged.emit(node)

    def _populate(self):
        node = self._nodes.currentNode()
        was = self._segments.blockSignals(True)
        self._segments.clear()
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is None or segmentation.GetNumberOfSegments() == 0:
            self._segments.blockSignals(was)
            self._segments.setVisible(False)
            return
        self._segments.setVisible(True)
        if self._nodes.noneEnabled:
            self._segments.addItem('None', 'None')
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        for segment_id in ids:
            self._segments.addItem(segmentation.GetSegment(segment_id).GetName(), segment_id)
        if (self._nodes.noneEnabled and not self._segmentId) or self._segmentId in ids:
            self._segments.setCurrentIndex(max(self._segments.findData(self._segmentId or 'None'), 0))
            self._segments.blockSignals(was)
        else:
            self._segments.setCurrentIndex(-1)
            self._segments.blockSignals(was)
            self._segments.setCurrentIndex(1 if self._nodes.noneEnabled else 0)

    def _onCurrentSegmentChanged(self, index):
        if self._nodes.currentNode() is None:
            return
        data = self._segments.itemData(index)
        self._segmentId = '' if data in (None, 'None') else data
        self.currentSegmentChanged.emit(self._segmentId)

    def currentNode(self):
        return self._nodes.currentNode()

    def setCurrentNode(self, node):
        self._nodes.setCurrentNode(node)

    def currentSegmentID(self):
        return self._segmentId

    def setCurrentSegmentID(self, segment_id):
        index = self._segments.findData(segment_id)
        if index >= 0:
            self._segments.setCurrentIndex(index)

    def getNoneEnabled(self):
        return self._nodes.noneEnabled

    def setNoneEnabled(self, enabled):
        self._nodes.noneEnabled = enabled

    noneEnabled = pyqtProperty(bool, getNoneEnabled, setNoneEnabled)


# --- slicer.util.loadUI ---
class _Policy(LoaderCreatorPolicy):
    """Designer's classes from `qt` (PythonQt's), CTK and qMRML ones from the stand-ins above."""

    def createQtGuiWidgetsWrappers(self):
        qt = _QT

        class Wrapper:
            @staticmethod
            def search(name):
                cls = CUSTOM.get(name) or getattr(QtWidgets, name, None) or getattr(QtGui, name, None)
                if cls is None or name in CUSTOM:
                    return cls
                return getattr(qt, name) if issubclass(cls, QtCore.QObject) else cls  # layouts too (their name)
        return [Wrapper]

    def createCustomWidgetLoader(self):
        class Loader:
            @staticmethod
            def addCustomWidget(widgetClass, baseClass, module):
                pass

            @staticmethod
            def search(name):
                return CUSTOM.get(name)
        return Loader()


class _UiLoader(UIParser):
    def __init__(self):
        UIParser.__init__(self, QtCore, QtGui, QtWidgets, _Policy(''))

    def createToplevelWidget(self, classname, widgetname):
        return self.factory.createQObject(classname, widgetname, ())


def loadUI(path):
    """slicer.util.loadUI (util.py v5.8.0:343, main:633): the widget of a .ui file, its <connections> made as
    QUiLoader makes them (by signal and slot signature; here through PythonQt's connect)."""
    root = ET.parse(path).getroot()
    connections = root.find('connections')
    if connections is not None:
        root.remove(connections)
    _UIC.append(path)
    try:
        widget = _UiLoader().parse(io.BytesIO(ET.tostring(root)), '_rc')
    finally:
        _UIC.clear()
    named = {QtCore.QObject.objectName(w): w for w in [widget, *widget.findChildren(QtCore.QObject)]}
    for c in ([] if connections is None else connections.iter('connection')):
        receiver, slot = named[c.findtext('receiver')], c.findtext('slot').split('(')[0]
        named[c.findtext('sender')].connect(c.findtext('signal'), getattr(receiver, slot))
    return widget


# --- slicer.parameterNodeWrapper (Base/Python/slicer/parameterNodeWrapper/) ---
class Validator:
    pass


class NotNone(Validator):  # validators.py v5.8.0 / main: 58-66
    def validate(self, value):
        if value is None:
            raise ValueError('Value must not be None')


class IsInstance(Validator):  # validators.py 69-80
    def __init__(self, classtype):
        self.classtype = classtype

    def validate(self, value):
        if not isinstance(value, self.classtype):
            raise TypeError(f"Value must be of type '{self.classtype}', is type '{type(value)}' value '{value}'")


class WithinRange(Validator):  # validators.py 83-95
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f'Value must be within range [{self.minimum}, {self.maximum}], is {value}')


class Choice(Validator):  # validators.py 126-137
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f'Value is {value}, but must be in one of the following: {self.choices}')


class _Connector:
    """guiConnectors.py GuiConnector (v5.8.0: 51-107): onChanged(callback) connects the widget's signal."""
    SIGNAL = ''

    def __init__(self, widget):
        self.widget, self.callback = widget, None

    def onChanged(self, callback):
        signal = getattr(self.widget, self.SIGNAL)
        if callback is None:
            signal.disconnect(self.changed)
        else:
            signal.connect(self.changed)
        self.callback = callback

    def changed(self, *args):
        if self.callback:
            self.callback()


class _CheckBoxConnector(_Connector):  # QCheckBoxToBoolConnector, guiConnectors.py 156-186 / main 162-
    SIGNAL = 'stateChanged'

    def read(self):
        return self.widget.checked

    def write(self, value):
        self.widget.checked = value


class _ComboBoxConnector(_Connector):
    """QComboBoxToStringableConnector (v5.8.0 355-400, main 418-463): clears and refills the combo box without
    blocking its signals (377 / 440), so its slots see '' and then the first item; write() looks the value up."""
    SIGNAL = 'currentIndexChanged'

    def __init__(self, widget, choices):
        super().__init__(widget)
        self.choices = choices
        widget.clear()
        for c in choices:
            widget.addItem(str(c))

    def read(self):
        return self.choices[self.widget.currentIndex]

    def write(self, value):
        self.widget.currentIndex = self.choices.index(value)  # ValueError for a value not among the choices


class _EnumConnector(_Connector):
    """QComboBoxToEnumConnector (v5.8.0 403-450, main 466-513): the members' label() (else their name) as items,
    the selection kept across the refill."""
    SIGNAL = 'currentIndexChanged'

    def __init__(self, widget, kind):
        super().__init__(widget)
        label = getattr(kind, 'label', lambda e: e.name)
        self.labels = [(label(e), e) for e in kind]
        saved = self.labels[widget.currentIndex][1] if 0 <= widget.currentIndex < len(self.labels) else None
        widget.clear()
        for text, _ in self.labels:
            widget.addItem(text)
        if saved is not None:
            self.write(saved)

    def read(self):
        return self.labels[self.widget.currentIndex][1]

    def write(self, value):
        self.widget.currentIndex = [e for _, e in self.labels].index(value)


class _SliderConnector(_Connector):  # QDoubleSpinBoxCtkSliderWidgetToFloatConnector, 289-352 / 352-415
    SIGNAL = 'valueChanged'

    def __init__(self, widget, within):
        super().__init__(widget)
        widget.minimum, widget.maximum = within.minimum, within.maximum

    def read(self):
        return self.widget.value

    def write(self, value):
        self.widget.value = value


class _NodeConnector(_Connector):  # qMRMLNodeComboBoxToNodeConnector, 677- / 745-: nodeTypes from the annotation
    SIGNAL = 'currentNodeChanged'

    def __init__(self, widget, node_type):
        super().__init__(widget)
        widget.nodeTypes = [node_type.__name__]

    def read(self):
        return self.widget.currentNode()

    def write(self, value):
        self.widget.setCurrentNode(value)


def _connector(widget, kind, annotations):
    """createGuiConnector (guiConnectors.py 124-139): chosen by the widget's exact type."""
    first = lambda cls: next((a for a in annotations if isinstance(a, cls)), None)  # noqa: E731
    wtype = type(widget)
    if wtype is _QT.QCheckBox and kind is bool:
        return _CheckBoxConnector(widget)
    if wtype is _QT.QComboBox and isinstance(kind, type) and issubclass(kind, enum.Enum):
        return _EnumConnector(widget, kind)
    if wtype is _QT.QComboBox and kind in (int, float, str, bool):
        if first(Choice) is None:
            raise RuntimeError('ComboBoxToStringableConnector requires the Choice annotation to be used.')
        return _ComboBoxConnector(widget, first(Choice).choices)
    if wtype is ctkSliderWidget and kind is float:
        if first(WithinRange) is None:
            raise RuntimeError('Cannot have a connection to ctkSliderWidget where the float types is unbounded.')
        return _SliderConnector(widget, first(WithinRange))
    if wtype is qMRMLNodeComboBox and isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
        return _NodeConnector(widget, kind)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{kind}' to widget type '{wtype}'.")


class ParameterNodeWrapper:
    """Values in the scripted module node's parameters (JSON; node IDs for nodes), defaults written on wrapping;
    every set runs the validators (wrapper.py / parameterInfo.py), a node parameter takes its class only."""
    allParameters: dict  # name -> (type, annotations, default)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guis, self._observers, self._nextTag, self._updating = {}, {}, 0, False
        for name, (_, _, default) in self.allParameters.items():
            if not parameterNode.GetParameter(name):
                self.setValue(name, default)

    def getValue(self, name):
        text = self.parameterNode.GetParameter(name)
        if not text:  # the scene was closed
            return self.allParameters[name][2]
        kind = self.allParameters[name][0]
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return kind[text]  # EnumSerializer.read (serializers.py v5.8.0 978-1010, main 1058-1090): by name
        value = json.loads(text)
        if self._isNode(name):
            return self.parameterNode.GetScene().GetNodeByID(value) if value else None
        return value

    def setValue(self, name, value):
        kind, annotations, _ = self.allParameters[name]
        for a in annotations:
            a.validate(value)
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            IsInstance(kind).validate(value)  # EnumSerializer comes with IsInstance (serializers.py 986 / 1066)
            self.parameterNode.SetParameter(name, value.name)
            return
        if self._isNode(name):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f'{name} takes a {kind.__name__}, not {value.GetClassName()}')
            value = value.GetID() if value is not None else None
        self.parameterNode.SetParameter(name, json.dumps(value))

    def _isNode(self, name):
        kind = self.allParameters[name][0]
        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def connectParametersToGui(self, mapping):
        """wrapper.py connectParametersToGui (v5.8.0 ~180-213, main ~180-215): names checked, a connector per
        widget, values written into the widgets, a tag returned."""
        for name in mapping:
            if name not in self.allParameters:
                raise ValueError(f'Cannot find a param with the given name: {name}')
        connectors = {name: _connector(widget, *self.allParameters[name][:2]) for name, widget in mapping.items()}
        tag, self._nextTag = self._nextTag, self._nextTag + 1
        self._guis[tag] = connectors
        for name, connector in connectors.items():
            connector.write(self.getValue(name))
            connector.onChanged(lambda name=name, connector=connector: self._guiChanged(name, connector))
        self._observers[tag] = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                              lambda caller, event: self._updateGui())
        APP.connections.append((self, mapping))
        return tag

    def connectGui(self, gui):
        """connectGui returns its tag only from 5.10 on."""
        is_widget = isinstance(gui, QtWidgets.QWidget)
        widgets = gui.findChildren(QtWidgets.QWidget) if is_widget else gui.__dict__.values()
        tag = self.connectParametersToGui({w.property('SlicerParameterName'): w for w in widgets
                                           if w.property('SlicerParameterName')})
        return tag if VERSION != '5.8' else None

    def disconnectGui(self, tag):
        """main also removes the node observer that 5.8 leaves behind (wrapper.py main:264)."""
        for connector in self._guis.pop(tag, {}).values():
            connector.onChanged(None)
        if VERSION != '5.8' and tag in self._observers:
            self.parameterNode.RemoveObserver(self._observers.pop(tag))

    def _guiChanged(self, name, connector):
        if not self._updating:
            self.setValue(name, connector.read())

    def _updateGui(self):
        if self._updating:
            return
        self._updating = True
        try:
            for connectors in self._guis.values():
                for name, connector in connectors.items():
                    connector.write(self.getValue(name))
        finally:
            self._updating = False

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)


def parameterNodeWrapper(cls):
    parameters = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        kind, *annotations = typing.get_args(hint) if typing.get_origin(hint) is typing.Annotated else (hint,)
        is_node = isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)
        default = getattr(cls, name) if hasattr(cls, name) else None if is_node else \
            next(iter(kind)) if issubclass(kind, enum.Enum) else kind()  # EnumSerializer.default: the first member
        parameters[name] = (kind, annotations, default)
    members = {name: property(lambda self, n=name: self.getValue(n), lambda self, v, n=name: self.setValue(n, v))
               for name in parameters}
    return type(cls.__name__, (ParameterNodeWrapper,), {**members, 'allParameters': parameters})


# --- slicer.ScriptedLoadableModule (ScriptedLoadableModule.py) ---
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent, self.moduleName = parent, type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len('Widget')]
        self.parent = parent
        self.layout = parent.layout()  # ScriptedLoadableModule.py v5.8.0 / main: 105

    def resourcePath(self, filename):
        return str(MODULE / 'Resources' / filename)

    def setup(self):
        pass  # the developer section (Reload, Test)

    def cleanup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len('Logic')] if type(self).__name__.endswith('Logic') else \
            type(self).__name__

    def getParameterNode(self):
        """ScriptedLoadableModule.py v5.8.0 / main 310-360: the scene's singleton node tagged with the module."""
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, 'vtkMRMLScriptedModuleNode')
        if node:
            node.SetAttribute('ModuleName', self.moduleName)
            return node
        node = scene.CreateNodeByClass('vtkMRMLScriptedModuleNode')
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute('ModuleName', self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return scene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        slicer.util.delayDisplay(message, msec or requestedDelay or 100)


# --- dialogs (util.py errorDisplay v5.8.0:2979 main:3359, confirmOkCancelDisplay 2992 / 3372) ---
def _errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    APP.dialogs.append(('error', text))
    QAPP.processEvents()  # a modal dialog runs an event loop of its own


def _confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    APP.dialogs.append(('confirm', text))
    QAPP.processEvents()
    if not APP.answers:
        raise AssertionError(f'an unexpected confirmation dialog: {text}')
    return APP.answers.pop(0)


def _delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    APP.dialogs.append(('delay', message))
    APP.processEvents()  # util.py delayDisplay 2913-2927 / 3293-3307


def _pip_install(args, **kwargs):
    APP.dialogs.append(('pip', args))
    if APP.pipError:
        raise APP.pipError


def _loadVolume(path):
    node = slicer.mrmlScene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', Path(path).name.split('.')[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node


_QT = _QtModule('qt')
_QT.QTimer, _QT.QSettings, _QT.QApplication = QTimer, QSettings, QApplication
CUSTOM = {c.__name__: c for c in (ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget, qMRMLWidget,
                                  qMRMLNodeComboBox, qMRMLSegmentSelectorWidget)}


def _excepthook(kind, value, tb):
    """An exception in a slot PyQt calls directly (not through _call): printed, recorded, the app goes on."""
    traceback.print_exception(kind, value, tb)
    if APP is not None:
        APP.slotErrors.append(value)


def appScene():
    """A scene as the app has it: default color nodes and three slice views."""
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(s)
    for view in ('Red', 'Yellow', 'Green'):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        s.AddNode(composite)
    s.colors_logic = colors  # keep it alive with the scene
    return s


def openPanel(module, size=(500, 1400)):
    """As Slicer shows a module panel: the widget made in its parent (a QVBoxLayout), set up, shown, then entered."""
    parent = qMRMLWidget()
    parent.setLayout(QtWidgets.QVBoxLayout())
    parent.isEntered = True
    widget = module.NNUNetCAMWidget(parent)
    widget.setup()
    parent.resize(*size)
    parent.show()
    widget.enter()
    return widget


def install(monkeypatch, scene, temporaryPath: str, version: str = 'main') -> App:
    """The stand-ins in sys.modules and on the real `slicer` module, undone by `monkeypatch`; settings in an ini file
    under temporaryPath. version '5.8': connectGui returns None and disconnectGui keeps the node observer; 'main':
    slicer.packaging exists (its pip_install is recorded in App.dialogs as ('pip', args), as slicer.util's is, and
    raises App.pipError when set)."""
    global APP, VERSION
    APP, VERSION = App(temporaryPath, version), version
    settings_dir = Path(temporaryPath).parent / 'settings'
    settings_dir.mkdir(exist_ok=True)
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(settings_dir))
    QtCore.QCoreApplication.setOrganizationName('NA-MIC')
    QtCore.QCoreApplication.setApplicationName('Slicer')
    monkeypatch.setattr(sys, 'excepthook', _excepthook)
    ctk = types.ModuleType('ctk')
    for cls in (ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget):
        setattr(ctk, cls.__name__, cls)
    wrapper = types.ModuleType('slicer.parameterNodeWrapper')
    for cls in (Choice, WithinRange, NotNone, IsInstance):
        setattr(wrapper, cls.__name__, cls)
    wrapper.parameterNodeWrapper = parameterNodeWrapper
    scripted = types.ModuleType('slicer.ScriptedLoadableModule')
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    modules = {'qt': _QT, 'ctk': ctk, 'slicer.parameterNodeWrapper': wrapper,
               'slicer.ScriptedLoadableModule': scripted}
    if version != '5.8':  # Base/Python/slicer/packaging/ exists on main only
        modules['slicer.packaging'] = types.ModuleType('slicer.packaging')
        modules['slicer.packaging'].pip_install = _pip_install
    else:
        monkeypatch.delitem(sys.modules, 'slicer.packaging', raising=False)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    colors, rendering, plots = slicer.vtkSlicerColorLogic(), slicer.vtkSlicerVolumeRenderingLogic(), \
        slicer.vtkSlicerPlotsLogic()
    rendering.SetMRMLScene(scene)
    plots.SetMRMLScene(scene)
    attributes = {'app': APP, 'mrmlScene': scene,
                  'modules': types.SimpleNamespace(colors=types.SimpleNamespace(logic=lambda: colors),
                                                   volumerendering=types.SimpleNamespace(logic=lambda: rendering),
                                                   plots=types.SimpleNamespace(logic=lambda: plots))}
    attributes.update(CUSTOM)
    for name, value in attributes.items():
        monkeypatch.setattr(slicer, name, value, raising=False)
    util = {'loadUI': loadUI, 'startupEnvironment': lambda: {}, 'errorDisplay': _errorDisplay,
            'confirmOkCancelDisplay': _confirmOkCancelDisplay, 'delayDisplay': _delayDisplay,
            'pip_install': _pip_install, 'loadVolume': _loadVolume}
    for name, value in util.items():
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    return APP
