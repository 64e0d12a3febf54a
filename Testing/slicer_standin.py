"""What NNUNetCAM.py needs from the Slicer app that the `slicer-core` wheel lacks, written to behave like Slicer's own
code as read in Slicer v5.8.0 and main (nothing of it is copied):
- parameterNodeWrapper/wrapper.py: connectGui(gui) looks for widgets in gui.__dict__ unless gui is a widget (so a dict
  raises AttributeError) and returns its tag only from 5.10 on; connectParametersToGui(mapping) checks the names,
  makes a connector per widget, writes the values into the widgets and returns a tag; disconnectGui(tag) drops those
  connectors (main also removes the node observer that 5.8 leaves behind).
- parameterNodeWrapper/guiConnectors.py: a connector is chosen by the widget's exact type and demands an annotation
  (Choice for a QComboBox, which it clears and refills; bounds for a ctkSliderWidget; a node type for a
  qMRMLNodeComboBox). Only the widget types the panel binds are modelled; any other raises, as an unknown one does.
- ScriptedLoadableModule.py: the module, widget, logic (singleton parameter node) and test base classes.
- PythonQt: `obj.connect('signal(args)', slot)` by exact signature; a slot gets as many arguments as it takes; an
  exception in a slot is printed and the caller goes on (here: collected in App.slotErrors).
Widgets are made from the .ui file by class name, with its <connections> and SlicerParameterName properties."""
import inspect
import json
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import vtk

import slicer

MODULE = Path(__file__).resolve().parent.parent / 'NNUNetCAM'


class App:
    """slicer.app, and what the stand-ins record."""

    def __init__(self, temporaryPath: str, version: str):
        self.temporaryPath, self.version = temporaryPath, version
        self.events = 0
        self.slotErrors = []
        self.pending = []  # qt.QTimer.singleShot callbacks, run by runPending()
        self.settings = {}
        self.connections = []  # (parameter node wrapper, mapping) of every connectParametersToGui
        self.dialogs = []  # (kind, text) of errorDisplay, confirmOkCancelDisplay, delayDisplay
        self.waitCursors = 0
        self.pipError = None  # raised by pip_install

    def processEvents(self):
        self.events += 1

    def runPending(self, seconds: float = 120):
        import time
        deadline = time.monotonic() + seconds
        while self.pending and time.monotonic() < deadline:
            self.pending.pop(0)()
            time.sleep(0.02)
        assert not self.pending, 'scheduled calls still pending'


APP = None  # the App of the installed stand-ins


# --- Qt through PythonQt ---
def _call(slot, args):
    try:
        params = inspect.signature(slot).parameters.values()
        if not any(p.kind == p.VAR_POSITIONAL for p in params):
            args = args[:sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)]
    except (TypeError, ValueError):
        pass
    try:
        slot(*args)
    except Exception as e:
        APP.slotErrors.append(e)


class Signal:
    def __init__(self, owner):
        self.owner, self.slots = owner, []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self, *args):
        if not self.owner.signalsBlocked:
            for slot in list(self.slots):
                _call(slot, args)


class QObject:
    SIGNALS = ()  # exact signatures, as PythonQt matches them

    def __init__(self, *args):
        self.name, self._children, self._properties, self.signalsBlocked = '', [], {}, False
        for signature in self.SIGNALS:
            setattr(self, signature.split('(')[0], Signal(self))

    def children(self):
        return list(self._children)

    def property(self, name):
        return self._properties.get(name)

    def connect(self, signature, slot):
        if signature not in self.SIGNALS:
            raise AttributeError(f'{type(self).__name__} has no signal {signature}')
        getattr(self, signature.split('(')[0]).connect(slot)

    def blockSignals(self, block):
        self.signalsBlocked = block

    def deleteLater(self):
        pass

    def isWidgetType(self):
        return False


class QLayout(QObject):
    def __init__(self, *args):
        super().__init__()
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


class QWidget(QObject):
    def __init__(self, *args):
        super().__init__()
        self.enabled = self.visible = True
        self.toolTip = ''
        self._layout = QLayout()

    def isWidgetType(self):
        return True

    def layout(self):
        return self._layout

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


class QLabel(QWidget):
    text = ''


class QPushButton(QWidget):
    SIGNALS = ('clicked(bool)',)
    text = ''


class QLineEdit(QWidget):
    SIGNALS = ('textChanged(QString)',)
    _text = ''

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, text):
        if text != self._text:
            self._text = text
            self.textChanged.emit(text)


class QProgressBar(QWidget):
    value = 0


class QPlainTextEdit(QWidget):
    def __init__(self, *args):
        super().__init__()
        self.lines = []

    def appendPlainText(self, line):
        self.lines.append(line)

    def clear(self):
        self.lines = []


class QCheckBox(QWidget):
    SIGNALS = ('toggled(bool)', 'stateChanged(int)')

    def __init__(self, text='', *args):
        super().__init__()
        self.text, self._checked = text, False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if value != self._checked:
            self._checked = value
            self.toggled.emit(value)
            self.stateChanged.emit(2 if value else 0)

    def setChecked(self, value):
        self.checked = value


class QRadioButton(QCheckBox):
    SIGNALS = ('toggled(bool)',)

    @QCheckBox.checked.setter
    def checked(self, value):
        if value != self._checked:
            self._checked = value
            self.toggled.emit(value)
            if value:  # auto-exclusive among its siblings
                for other in self.parent.children():
                    if isinstance(other, QRadioButton) and other is not self:
                        other.checked = False


class QComboBox(QWidget):
    SIGNALS = ('currentIndexChanged(int)', 'currentTextChanged(QString)')

    def __init__(self, *args):
        super().__init__()
        self.items, self._index = [], -1  # [text, {role: data}]

    @property
    def count(self):
        return len(self.items)

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    @property
    def currentText(self):
        return self.items[self._index][0] if self._index >= 0 else ''

    @currentText.setter
    def currentText(self, text):  # a non-editable combo box selects the matching item, if any
        index = self.findText(text)
        if index >= 0:
            self.currentIndex = index

    def addItem(self, text, data=None):
        self.items.append([text, {Qt.UserRole: data}])
        if self._index < 0:
            self.currentIndex = 0

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def clear(self):
        self.items = []
        self.currentIndex = -1

    def findText(self, text):
        return next((i for i, item in enumerate(self.items) if item[0] == text), -1)

    def findData(self, data):
        return next((i for i, item in enumerate(self.items) if item[1].get(Qt.UserRole) == data), -1)

    def itemData(self, index, role=256):
        return self.items[index][1].get(role) if 0 <= index < len(self.items) else None

    def setItemData(self, index, data, role=256):
        self.items[index][1][role] = data

    def setItemText(self, index, text):
        self.items[index][0] = text


class ctkCollapsibleButton(QWidget):
    pass


class ctkPathLineEdit(QWidget):
    SIGNALS = ('currentPathChanged(QString)',)
    _path = ''

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        if path != self._path:
            self._path = path
            self.currentPathChanged.emit(path)


class ctkSliderWidget(QWidget):
    SIGNALS = ('valueChanged(double)',)

    def __init__(self, *args):
        super().__init__()
        self._min, self._max, self._value = 0.0, 99.0, 0.0

    def _set(self, value):
        value = min(max(value, self._min), self._max)
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)

    value = property(lambda self: self._value, _set)
    minimum = property(lambda self: self._min, lambda self, v: (setattr(self, '_min', v), self._set(self._value)))
    maximum = property(lambda self: self._max, lambda self, v: (setattr(self, '_max', v), self._set(self._value)))


class qMRMLWidget(QWidget):
    SIGNALS = ('mrmlSceneChanged(vtkMRMLScene*)',)

    def setMRMLScene(self, scene):
        self.mrmlScene = scene
        self.mrmlSceneChanged.emit(scene)


class qMRMLNodeComboBox(qMRMLWidget):
    SIGNALS = (*qMRMLWidget.SIGNALS, 'currentNodeChanged(vtkMRMLNode*)')
    mrmlScene = _node = None
    nodeTypes = ()

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not None and self.mrmlScene is None:
            return  # without a scene the combo box lists no node
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)


class qMRMLSegmentSelectorWidget(qMRMLNodeComboBox):
    def currentSegmentID(self):
        return ''


class QTimer:
    @staticmethod
    def singleShot(ms, callback):
        APP.pending.append(callback)


class QSettings:
    def value(self, key, default=None):
        return APP.settings.get(key, default)

    def setValue(self, key, value):
        APP.settings[key] = value


class Qt:
    ToolTipRole, UserRole = 3, 256


WIDGETS = {c.__name__: c for c in (QWidget, QLabel, QLineEdit, QPushButton, QProgressBar, QPlainTextEdit, QCheckBox, QRadioButton,
                                   QComboBox, ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget, qMRMLWidget,
                                   qMRMLNodeComboBox, qMRMLSegmentSelectorWidget)}
LAYOUTS = ('QVBoxLayout', 'QHBoxLayout', 'QFormLayout')


def loadUI(path):
    """slicer.util.loadUI: the widget tree of a .ui file (class, name, checked, text, combo-box items, dynamic
    properties) with its signal-slot connections."""
    root = ET.parse(path).getroot()
    named = {}

    def build(element, parent):
        if element.tag == 'layout':
            if element.get('class') not in LAYOUTS:
                raise ValueError(f'no stand-in for {element.get("class")}')
            obj = QLayout()
        else:
            obj = WIDGETS[element.get('class')]()
            obj.parent = parent
        obj.name = element.get('name')
        named[obj.name] = obj
        if parent is not None:
            parent._children.append(obj)
        for prop in element.findall('property'):
            value = prop[0].text if prop[0].tag in ('string', 'cstring') else prop[0].text == 'true' \
                if prop[0].tag == 'bool' else None
            if prop.get('stdset') == '0':
                obj._properties[prop.get('name')] = value
            elif prop.get('name') in ('checked', 'text') and value is not None:
                setattr(obj, prop.get('name'), value)
        for item in element.findall('item'):
            if isinstance(obj, QComboBox):
                obj.addItem(item.find("property[@name='text']/string").text)
        for child in _contained(element):
            built = build(child, obj if element.tag == 'widget' else parent)
            if element.tag == 'layout' and child.tag == 'widget':
                obj.addWidget(built)
        return obj

    top = build(root.find('widget'), None)
    for c in root.iter('connection'):
        sender, receiver = named[c.findtext('sender')], named[c.findtext('receiver')]
        sender.connect(c.findtext('signal'), getattr(receiver, c.findtext('slot').split('(')[0]))
    return top


def _contained(element):
    """The <widget> and <layout> elements directly inside `element` (through <item>s)."""
    for child in element:
        if child.tag in ('widget', 'layout'):
            yield child
        else:
            yield from _contained(child)


# --- slicer.parameterNodeWrapper ---
class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f'{value!r} is not one of {self.choices}')


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f'{value} is not within [{self.minimum}, {self.maximum}]')


class _Connector:
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

    def changed(self):
        if self.callback:
            self.callback()


class _CheckBoxConnector(_Connector):
    SIGNAL = 'stateChanged'
    read = lambda self: self.widget.checked  # noqa: E731

    def write(self, value):
        self.widget.checked = value


class _ComboBoxConnector(_Connector):
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
        if value not in self.choices:
            raise ValueError(f'Unable to find value {value} in choices {self.choices}')
        self.widget.currentIndex = self.choices.index(value)


class _SliderConnector(_Connector):
    SIGNAL = 'valueChanged'

    def __init__(self, widget, within):
        super().__init__(widget)
        widget.minimum, widget.maximum = within.minimum, within.maximum

    def read(self):
        return self.widget.value

    def write(self, value):
        self.widget.value = value


class _NodeConnector(_Connector):
    SIGNAL = 'currentNodeChanged'

    def __init__(self, widget, node_type):
        super().__init__(widget)
        widget.nodeTypes = [node_type.__name__]

    def read(self):
        return self.widget.currentNode()

    def write(self, value):
        self.widget.setCurrentNode(value)


def _connector(widget, kind, annotations):
    widget_type = type(widget).__name__
    first = lambda cls: next((a for a in annotations if isinstance(a, cls)), None)  # noqa: E731
    if widget_type == 'QCheckBox' and kind is bool:
        return _CheckBoxConnector(widget)
    if widget_type == 'QComboBox' and kind in (int, float, str, bool):
        if first(Choice) is None:
            raise RuntimeError('ComboBoxToStringableConnector requires the Choice annotation to be used.')
        return _ComboBoxConnector(widget, first(Choice).choices)
    if widget_type == 'ctkSliderWidget' and kind is float:
        if first(WithinRange) is None:
            raise RuntimeError('Cannot have a connection to ctkSliderWidget where the float types is unbounded.')
        return _SliderConnector(widget, first(WithinRange))
    if widget_type == 'qMRMLNodeComboBox' and isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
        return _NodeConnector(widget, kind)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{kind}' to widget type '{type(widget)}'.")


class ParameterNodeWrapper:
    """Values in the scripted module node's parameters (JSON; node IDs for nodes), defaults written on wrapping."""
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
        value = json.loads(text)
        if self._isNode(name):
            return self.parameterNode.GetScene().GetNodeByID(value) if value else None
        return value

    def setValue(self, name, value):
        kind, annotations, _ = self.allParameters[name]
        for a in annotations:
            a.validate(value)
        if self._isNode(name):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f'{name} takes a {kind.__name__}, not {value.GetClassName()}')
            value = value.GetID() if value is not None else None
        self.parameterNode.SetParameter(name, json.dumps(value))

    def _isNode(self, name):
        kind = self.allParameters[name][0]
        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def connectParametersToGui(self, mapping):
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
        is_widget = getattr(gui, 'isWidgetType', lambda: False)()
        widgets = _descendants(gui) if is_widget else gui.__dict__.values()
        tag = self.connectParametersToGui({w.property('SlicerParameterName'): w for w in widgets
                                           if w.property('SlicerParameterName')})
        return tag if VERSION != '5.8' else None

    def disconnectGui(self, tag):
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


def _descendants(widget):
    out = []
    for child in widget.children():
        out += [child, *_descendants(child)]
    return out


def parameterNodeWrapper(cls):
    parameters = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        kind, *annotations = typing.get_args(hint) if typing.get_origin(hint) is typing.Annotated else (hint,)
        is_node = isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)
        parameters[name] = (kind, annotations, getattr(cls, name, None if is_node else kind()))
    members = {name: property(lambda self, n=name: self.getValue(n), lambda self, v, n=name: self.setValue(n, v))
               for name in parameters}
    return type(cls.__name__, (ParameterNodeWrapper,), {**members, 'allParameters': parameters})


# --- slicer.ScriptedLoadableModule ---
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent, self.moduleName = parent, type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len('Widget')]
        self.parent = parent
        self.layout = parent.layout()

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


class WaitCursor:
    def __enter__(self):
        APP.waitCursors += 1

    def __exit__(self, *exc):
        return False


VERSION = 'main'


def install(monkeypatch, scene, temporaryPath: str, version: str = 'main') -> App:
    """The stand-ins in sys.modules and on the real `slicer` module, undone by `monkeypatch`. version '5.8': connectGui
    returns None and disconnectGui keeps the node observer; 'main': slicer.packaging exists (its pip_install is
    recorded in App.dialogs as ('pip', args), as slicer.util.pip_install's is, and raises App.pipError when set)."""
    global APP, VERSION
    APP, VERSION = App(temporaryPath, version), version
    qt = types.ModuleType('qt')
    for cls in (*WIDGETS.values(), QObject, QTimer, QSettings, Qt):
        setattr(qt, cls.__name__, cls)
    wrapper = types.ModuleType('slicer.parameterNodeWrapper')
    wrapper.parameterNodeWrapper, wrapper.Choice, wrapper.WithinRange = parameterNodeWrapper, Choice, WithinRange
    scripted = types.ModuleType('slicer.ScriptedLoadableModule')
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    modules = {'qt': qt, 'slicer.parameterNodeWrapper': wrapper, 'slicer.ScriptedLoadableModule': scripted}
    if version != '5.8':
        modules['slicer.packaging'] = types.ModuleType('slicer.packaging')
        modules['slicer.packaging'].pip_install = _pip_install
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    colors, rendering, plots = slicer.vtkSlicerColorLogic(), slicer.vtkSlicerVolumeRenderingLogic(), \
        slicer.vtkSlicerPlotsLogic()
    rendering.SetMRMLScene(scene)
    plots.SetMRMLScene(scene)
    for name, value in {'app': APP, 'mrmlScene': scene,
                        'modules': types.SimpleNamespace(colors=types.SimpleNamespace(logic=lambda: colors),
                                                         volumerendering=types.SimpleNamespace(logic=lambda: rendering),
                                                         plots=types.SimpleNamespace(logic=lambda: plots))
                        }.items():
        monkeypatch.setattr(slicer, name, value, raising=False)
    util = {'loadUI': loadUI, 'WaitCursor': WaitCursor, 'startupEnvironment': lambda: {},
            'errorDisplay': lambda text, **kw: APP.dialogs.append(('error', text)),
            'confirmOkCancelDisplay': lambda text, **kw: APP.dialogs.append(('confirm', text)) or True,
            'delayDisplay': lambda text, msec=None: APP.dialogs.append(('delay', text)),
            'pip_install': _pip_install,
            'loadVolume': _loadVolume}
    for name, value in util.items():
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    return APP


def _pip_install(args):
    APP.dialogs.append(('pip', args))
    if APP.pipError:
        raise APP.pipError


def _loadVolume(path):
    node = slicer.mrmlScene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', Path(path).name.split('.')[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node
