"""NNUNetCAM's logic, free of Qt: testable with the `slicer-core` wheel and usable from Slicer's Python console."""
from .display import COLORMAPS, DEFAULT_COLORMAP
from .environment import (PythonEnvironment, excluded_requirements, install_requirements, missing_requirements,
                          torch_install_arguments)
from .logic import CamResult, CamRun, DisplayOptions, NNUNetCAMLogic, layer_choices, model_info, target_classes

__all__ = ['COLORMAPS', 'DEFAULT_COLORMAP', 'PythonEnvironment', 'excluded_requirements', 'install_requirements',
           'missing_requirements', 'torch_install_arguments', 'CamResult', 'CamRun', 'DisplayOptions', 'NNUNetCAMLogic', 'layer_choices',
           'model_info', 'target_classes']
