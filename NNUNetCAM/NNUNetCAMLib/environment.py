"""Which Python runs the core: Slicer's own (with the requirements installed on first use) or one the user picks,
such as the environment where they trained nnU-Net. The bundled core goes first on that Python's PYTHONPATH."""
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, List, Optional

from .process import run_to_end, stdout_of

CORE_PACKAGE = 'nnunetv2_cam_core'
# Slicer ships these; installing the core's requirements pins them so pip never replaces or downgrades them
SHIPPED_WITH_SLICER = ('numpy', 'SimpleITK', 'vtk', 'requests', 'packaging', 'pillow')
TORCH_PACKAGES = ('torch', 'torchvision')


def bundled_core_dir() -> Path:
    """The folder holding nnunetv2_cam_core: next to the module when installed, the repository root in a checkout."""
    module_dir = Path(__file__).resolve().parent.parent
    for d in (module_dir, module_dir.parent):
        if (d / CORE_PACKAGE / '__init__.py').is_file():
            return d
    raise FileNotFoundError(f'the bundled {CORE_PACKAGE} is missing next to {module_dir}; reinstall the NNUNetCAM '
                            f'extension')


def ensure_core_importable() -> None:
    """The module reads model folders with the core's torch-free `model` helpers in Slicer's own process."""
    d = str(bundled_core_dir())
    if d not in sys.path:
        sys.path.insert(0, d)


def slicer_python() -> str:
    return shutil.which('PythonSlicer') or sys.executable


class PythonEnvironment:
    """`executable=None` is Slicer's own Python. `base_env` for another Python: the environment Slicer was started
    with (`slicer.util.startupEnvironment()`), since Slicer's own PYTHONHOME/PYTHONPATH would break that Python."""

    def __init__(self, executable: Optional[str] = None, base_env: Optional[dict] = None):
        self.executable = executable or slicer_python()
        self.is_slicer_python = not executable
        self.base_env = base_env

    def describe(self) -> str:
        return "Slicer's Python" if self.is_slicer_python else self.executable

    def command(self, *args) -> List[str]:
        return [self.executable, '-m', CORE_PACKAGE, *map(str, args)]

    def env(self) -> dict:
        env = dict(os.environ if self.is_slicer_python or self.base_env is None else self.base_env)
        if not self.is_slicer_python:
            env.pop('PYTHONHOME', None)
            env.pop('PYTHONPATH', None)
        env['PYTHONPATH'] = os.pathsep.join(p for p in (str(bundled_core_dir()), env.get('PYTHONPATH')) if p)
        env['PYTHONUNBUFFERED'] = '1'
        return env

    def check(self, timeout: float = 180, event_pump: Optional[Callable[[], None]] = None) -> dict:
        """`check-env` in that Python: {'ok', 'message', 'versions', 'devices', ...}."""
        if not self.is_slicer_python and not Path(self.executable).is_file():
            return {'ok': False, 'message': f'{self.executable} does not exist; pick a python executable '
                                            f'(e.g. .../envs/nnunet/bin/python)'}
        try:
            return self.parse_check(*run_to_end(self.command('check-env'), self.env(), timeout, event_pump))
        except OSError as e:
            return {'ok': False, 'message': f'cannot start {self.executable} ({e.strerror}); pick a python executable'}

    def parse_check(self, rc: Optional[int], events: List[dict]) -> dict:
        try:
            info = json.loads(stdout_of(events))
        except ValueError:
            last = [e['message'] for e in events if e.get('event') in ('log', 'error')][-1:] or ['no output']
            return {'ok': False, 'message': f'{self.describe()} cannot run {CORE_PACKAGE} (exit {rc}): {last[0]}'}
        if not info.get('ok'):
            return {**info, 'ok': False}
        devices = ', '.join(info.get('devices', []))
        return {**info, 'message': f'{self.describe()}: nnunetv2 {info["versions"].get("nnunetv2")}, torch '
                                   f'{info["versions"].get("torch")}; devices: {devices}'}


def requirement_lines(requirements_file: Path) -> List[str]:
    """The requirement lines of a requirements file, without comments."""
    return [line for line in (raw.split('#')[0].strip() for raw in Path(requirements_file).read_text().splitlines())
            if line]


def _applies(requirement) -> bool:
    """Its environment marker holds for this Python (read now: packaging caches its own default environment)."""
    python = platform.python_version()
    return requirement.marker is None or requirement.marker.evaluate(
        {'python_version': '.'.join(python.split('.')[:2]), 'python_full_version': python})


def excluded_requirements(requirements_file: Path) -> List[str]:
    """Lines whose environment marker leaves this Python out: they do not install here."""
    from packaging.requirements import Requirement
    return [line for line in requirement_lines(requirements_file) if not _applies(Requirement(line))]


def missing_requirements(requirements_file: Path) -> List[str]:
    """Lines of a requirements file that this (Slicer's) Python does not satisfy (those its markers leave out
    excepted)."""
    from packaging.requirements import Requirement
    missing = []
    for line in requirement_lines(requirements_file):
        req = Requirement(line)
        if not _applies(req):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            missing.append(line)
            continue
        if not req.specifier.contains(have, prereleases=True):
            missing.append(line)
    return missing


def torch_install_arguments(lines: List[str]) -> dict:
    """The version specifiers of torch and torchvision among requirement lines, as the keyword arguments of the
    PyTorch extension's PyTorchUtilsLogic.installTorch (which installs both)."""
    from packaging.requirements import Requirement
    specifiers = {r.name.lower(): str(r.specifier) or None for r in map(Requirement, lines)}
    return {'torchVersionRequirement': specifiers.get('torch'),
            'torchvisionVersionRequirement': specifiers.get('torchvision')}


def install_requirements(missing: List[str], pip_install: Callable[[List[str]], None],
                         install_torch: Optional[Callable[[List[str]], None]] = None,
                         log: Callable[[str], None] = print) -> None:
    """torch through `install_torch` (the PyTorch extension picks the right CUDA build) when given, the rest with
    pip under constraints that pin what Slicer ships (and torch, once installed) to the installed versions."""
    from packaging.requirements import Requirement
    names = {line: Requirement(line).name.lower() for line in missing}
    torch_lines = [line for line in missing if names[line] in TORCH_PACKAGES]
    rest = [line for line in missing if names[line] not in TORCH_PACKAGES]
    shipped = [line for line in rest if names[line] in {n.lower() for n in SHIPPED_WITH_SLICER}]
    if shipped:
        raise RuntimeError(f'{", ".join(shipped)} would replace a package Slicer ships; use a newer Slicer or '
                           f'pick your own Python environment instead')
    if torch_lines and install_torch is not None:
        log(f'installing {" ".join(torch_lines)} with the PyTorch extension')
        try:
            install_torch(torch_lines)
        except Exception as e:
            raise RuntimeError(f'the PyTorch extension could not install {" ".join(torch_lines)} ({e}); install '
                               f'them in its PyTorch Utils module, then try again') from e
    else:
        rest = torch_lines + rest
    if not rest:
        return
    pins = []
    for name in (*SHIPPED_WITH_SLICER, *(TORCH_PACKAGES if install_torch is not None else ())):
        try:
            pins.append(f'{name}=={version(name)}')
        except PackageNotFoundError:
            pass
    with tempfile.TemporaryDirectory() as d:
        constraints = Path(d, 'constraints.txt')
        constraints.write_text('\n'.join(pins) + '\n')
        log(f'pip install {" ".join(rest)} (keeping {", ".join(pins)})')
        pip_install(['-c', str(constraints), *rest])
