"""NNUNetCAMLogic: write the input for the core, run the core in the background, load its outputs as nodes.

    logic = NNUNetCAMLogic()
    result = logic.run(volume, '/models/.../nnUNetTrainer__nnUNetPlans__3d_fullres', targetClass='lesion')
    result.cams['lesion'], result.segmentation

Qt-free: the background run advances in CamRun.poll(), which the panel calls from a timer (or `scheduler`), and
which `wait=True` calls in a loop, processing Slicer's events in between so the app stays responsive. Nodes are only
added in poll(), on the caller's thread, after the core succeeded.
"""
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import slicer

from . import display, evaluation, volumes
from .environment import PythonEnvironment, ensure_core_importable
from .process import CoreProcess, run_to_end, stdout_of
from .server import LocalServer, ServerConnection, ServerRun

WRITABLE_ENDINGS = ('.nii.gz', '.nii', '.nrrd', '.mha', '.mhd')
LAYER_TOOLTIP = ('The last decoder stage is preselected: on 2D and 3D test models, and on scans unlike their training '
                 'data, its maps pointed at what the prediction needs better than the bottleneck\'s (deletion and '
                 'insertion against random), did not change with the tiling, and matched the map of the whole scan '
                 'in one piece; bottleneck maps did not. Earlier (encoder) stages are coarser: "what", not "where".')
# progress bar share of each core stage: (start, end)
STAGES = {'upload': (0.0, 0.06, 'Sending the case to the server'), 'held': (0.0, 0.06, 'Case already on the server'),
          'load': (0.0, 0.06, 'Loading the model'),
          'previous_stage': (0.06, 0.10, 'Low-resolution stage of the cascade (segmentation only)'),
          'preprocess': (0.10, 0.13, 'Preprocessing'), 'tiles': (0.13, 0.92, 'Sliding window'), 'export': (0.92, 0.97, 'Writing results'),
          'done': (0.97, 0.99, 'Loading results into Slicer')}
# with --evaluate the tiles take a smaller share: the evaluation takes several runs' time; each fold's map, one run's
FOLD_SPREAD_STAGES = {**STAGES, 'tiles': (0.13, 0.55, 'Sliding window'), 'fold_spread': (0.55, 0.92, 'Maps of each fold')}
EVALUATION_STAGES = {**STAGES, 'tiles': (0.13, 0.30, 'Sliding window'),
                     'evaluate': (0.30, 0.88, 'Evaluating the map (deletion, insertion, sanity check)'),
                     'fold_spread': (0.88, 0.92, 'Maps of each fold')}


@dataclass
class CamResult:
    segmentation: object
    cams: Dict[str, object]
    sidecar: dict
    notes: List[str] = field(default_factory=list)
    evaluationTable: object = None   # the trust figures, one row per class (evaluate=True)
    evaluationChart: object = None   # their deletion and insertion curves
    foldSpread: Dict[str, object] = field(default_factory=dict)

    def nodes(self) -> list:
        extra = [n for n in (self.evaluationTable, self.evaluationChart) if n is not None]
        return [self.segmentation, *self.cams.values(), *self.foldSpread.values(), *extra]


@dataclass
class DisplayOptions:
    colormap: str = display.DEFAULT_COLORMAP
    threshold: float = 0.2
    opacity: float = 0.5
    color_legend: bool = True
    volume_rendering: bool = False


def model_info(folder: Union[str, Path]) -> dict:
    """Configuration, trained folds, labels, channel names and file ending, read with the core's own rules
    (same checks and messages as a core run)."""
    ensure_core_importable()
    from nnunetv2_cam_core.model import describe_model
    return describe_model(folder)


def target_classes(info: dict) -> List[str]:
    """The classes (or regions) the model can explain, in output order: no background, no ignore label."""
    return list(info['classes'])


def layer_choices(rows: List[dict]) -> List[tuple]:
    """(module name, label) for the encoder and decoder stages from `--list-layers`, the default first."""
    out = []
    for r in rows:
        parts = r['name'].split('.')
        if len(parts) != 3 or parts[1] != 'stages' or r['shape'] is None:
            continue
        factor = max(r['stride'])
        resolution = 'full resolution' if factor == 1 else f'1/{factor:g} resolution'
        kind = r['mark'] or f'{parts[0]} stage {parts[2]}'
        size = '×'.join(map(str, r['shape'][1:]))
        out.append((r['name'], f'{r["name"]}: {kind}, {resolution} ({r["shape"][0]} ch, {size} per tile)'))
    return sorted(out, key=lambda c: '(default)' not in c[1])


def stdout_json(rc: Optional[int], events: List[dict]):
    """The JSON a short core call printed, or RuntimeError with the core's one-line message."""
    if rc == 0:
        try:
            return json.loads(stdout_of(events))
        except ValueError:
            pass
    errors = [e['message'] for e in events if e.get('event') == 'error']
    last = [e['message'] for e in events if e.get('event') == 'log'][-1:] or ['no output']
    raise RuntimeError(errors[-1] if errors else f'the core failed (exit {rc}): {last[0]}')


class CamRun:
    """One background core run. poll() returns True while it is running."""

    def __init__(self, process: CoreProcess, workdir: Path, sidecar: Path, load: Callable[[dict], CamResult],
                 on_progress=None, on_log=None, on_finished=None, on_error=None, stages: Optional[dict] = None):
        self.process, self.workdir, self.sidecar, self._load = process, workdir, sidecar, load
        self.stages = stages or STAGES
        self.on_progress, self.on_log, self.on_finished, self.on_error = on_progress, on_log, on_finished, on_error
        self.state = 'running'  # running, done, failed, cancelled
        self.fraction = 0.0
        self.result: Optional[CamResult] = None
        self.error: Optional[str] = None
        self.log: List[str] = [' '.join(process.command)]
        self._errors: List[str] = []

    @property
    def running(self) -> bool:
        return self.state == 'running'

    def poll(self) -> bool:
        if not self.running:
            return False
        for event in self.process.poll():
            self._handle(event)
        rc = self.process.returncode
        if rc is None:
            return True
        for event in self.process.poll():
            self._handle(event)
        if rc == 0:
            self._finish()
        else:
            self._fail(self._errors[-1] if self._errors else f'the core stopped with exit code {rc}; see the log')
        return False

    def _handle(self, event: dict) -> None:
        kind = event.get('event')
        if kind == 'log':
            line = event['message']
            if line.startswith('error: ') and not self._errors:
                self._errors.append(line[len('error: '):])
            self._log(line)
        elif kind == 'error':
            self._errors.append(event['message'])
        elif kind == 'stage' and event['stage'] in self.stages:
            start, _, text = self.stages[event['stage']]
            self._progress(start, text)
        elif kind in ('tiles', 'steps') and event.get('stage') in self.stages:
            start, end, text = self.stages[event['stage']]
            unit = kind[:-1]
            self._progress(round(start + (end - start) * event['fraction'], 6),  # not past the next stage's start
                           f'{text}: {unit} {event[unit]}/{event[kind]}, about {event["eta_s"]:.0f} s left')
        elif kind in ('warning', 'result', 'skip'):
            self._log(event.get('message', str(event)))

    def _progress(self, fraction: float, text: str) -> None:
        self.fraction = fraction
        if self.on_progress:
            self.on_progress(fraction, text)

    def _log(self, line: str) -> None:
        self.log.append(line)
        if self.on_log:
            self.on_log(line)

    def _finish(self) -> None:
        try:
            sidecar = json.loads(self.sidecar.read_text())
            self.result = self._load(sidecar)
        except Exception as e:
            self._fail(str(e))
            return
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.state = 'done'
        self._progress(1.0, 'Done')
        for note in self.result.notes:
            self._log(note)
        if self.on_finished:
            self.on_finished(self.result)

    def _fail(self, message: str) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.state, self.error = 'failed', message
        self._log(f'error: {message}')
        if self.on_error:
            self.on_error(message)

    def cancel(self) -> None:
        """Kill the core's process tree, delete the temporary folder; no nodes are added."""
        if not self.running:
            return
        self.process.cancel()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.state = 'cancelled'
        self._log('cancelled')

    def wait(self, timeout: Optional[float] = None, event_pump: Optional[Callable[[], None]] = None) -> CamResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f'the CAM run took longer than {timeout:.0f} s and was cancelled')
            if event_pump:
                event_pump()
            time.sleep(0.05)
        if self.state != 'done':
            raise RuntimeError(self.error or self.state)
        return self.result


def app_event_pump() -> Optional[Callable[[], None]]:
    """slicer.app.processEvents inside the Slicer app (as Slicer's own blocking helpers call it), else None."""
    app = getattr(slicer, 'app', None)
    return app.processEvents if app is not None else None


class NNUNetCAMLogic:
    """`scene`: defaults to slicer.mrmlScene. `scheduler(ms, fn)`: runs fn later on the main thread (in Slicer,
    qt.QTimer.singleShot), so `wait=False` runs advance by themselves; without one, call run.poll().
    `event_pump()`: called while a blocking call waits; defaults to Slicer's event processing in the app."""

    def __init__(self, scene=None, environment: Optional[PythonEnvironment] = None,
                 temp_root: Optional[str] = None, scheduler: Optional[Callable] = None,
                 volume_rendering_logic=None, event_pump: Optional[Callable[[], None]] = None, plots_logic=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.environment = environment or PythonEnvironment()
        self.temp_root = temp_root
        self.scheduler = scheduler
        self.volume_rendering_logic = volume_rendering_logic
        self.plots_logic = plots_logic  # slicer.modules.plots.logic(): shows the evaluation's curves
        self.event_pump = event_pump or app_event_pump()
        self.current: Optional[CamRun] = None
        self.localServer = LocalServer(self.environment, temp_root)  # started by the first run that asks for it

    def cleanup(self) -> None:
        """Stop the local server (the module's cleanup; it also leaves by itself if Slicer dies)."""
        self.localServer.shutdown()

    def serverStatus(self, server: Union[str, ServerConnection, None] = 'local') -> str:
        """What the server holds: models loaded, cases cached, device; 'not started' for a local one not yet used."""
        if server == 'local':
            return self.localServer.connection.status() if self.localServer.connection else 'not started'
        return server.status()

    # --- short core calls: --list-methods, --list-layers, check-env ---
    def callCore(self, args: Sequence, onDone: Optional[Callable] = None, timeout: float = 300):
        """(returncode, events) of a short core call; with onDone and a scheduler, onDone(returncode, events)
        is called later and nothing blocks."""
        if onDone is None or self.scheduler is None:
            result = run_to_end(self.environment.command(*args), self.environment.env(), timeout, self.event_pump)
            return onDone(*result) if onDone else result
        process, events = CoreProcess(self.environment.command(*args), self.environment.env()), []

        def tick():
            events.extend(process.poll())
            if process.returncode is None:
                self.scheduler(100, tick)
            else:
                onDone(process.returncode, events + process.poll())
        self.scheduler(100, tick)
        return process

    def listMethods(self) -> Dict[str, str]:
        return stdout_json(*self.callCore(['--list-methods', '--progress', 'json']))

    def listLayers(self, modelFolder, device: str = 'cpu') -> List[dict]:
        return stdout_json(*self.callCore(['--list-layers', '-m', modelFolder, '-device', device, '--progress', 'json']))

    # --- the run ---
    def run(self, inputVolume, modelFolder, targetClass: Union[None, str, Sequence[str]] = None,
            method: str = 'gradcam', layers: Optional[Sequence[str]] = None, folds: Optional[Sequence] = None,
            device: str = 'auto', tta: bool = True, channelVolumes: Sequence = (), targetSegmentation=None,
            targetSegmentId: Optional[str] = None, targetRoi=None, targetPoint=None, pointRadiusMm: float = 10.0,
            displayOptions: Optional[DisplayOptions] = None,
            outputFolder: Optional[str] = None, evaluate: bool = False, evaluationSteps: Optional[int] = None,
            foldSpread: bool = False, server: Union[None, str, ServerConnection] = None, wait: bool = True,
            onProgress=None, onLog=None, onFinished=None, onError=None):
        """Segmentation + CAM(s) of `inputVolume`. wait=True returns a CamResult (raises RuntimeError with the
        core's one-line message on failure); wait=False returns the CamRun and reports through the callbacks.
        `evaluate`: also the trust figures (a table, the curves in a plot, a sanity-check line per class), with
        curves of `evaluationSteps` steps (default 10);
        `foldSpread`: also where the folds' maps disagree, as one more volume per class.
        `outputFolder`: also keep the core's files (segmentation, CAMs, sidecar) there; otherwise they are
        deleted with the temporary folder once loaded.
        `targetPoint` (a markups point list; its first point) with `pointRadiusMm`, `targetRoi` or a segment:
        explain that region only ("Explain here").
        `server`: None runs a core process for this run; 'local' a server on this computer, started on first use
        and kept (the case and model stay loaded, so another class or a region of the same volume is quick); a
        ServerConnection, a remote server, where `modelFolder` is the server's model id."""
        if self.current is not None and self.current.running:
            raise RuntimeError('a CAM run is already going; wait for it to finish or cancel it')
        if inputVolume is None:
            raise ValueError('no input volume; select the volume to explain')
        if server is not None and (evaluate or foldSpread):
            raise ValueError('the evaluation and the fold spread run without a server; untick them or compute '
                             'without a server')
        if server == 'local':
            self.localServer.environment = self.environment  # the Python chosen now
            onError = self._restart_server_after(onError)
        connection = self.localServer.connect(modelFolder, device, self.event_pump) if server == 'local' else server
        info = connection.model_info('.' if server == 'local' else modelFolder) if connection else \
            model_info(modelFolder)
        classes = [targetClass] if isinstance(targetClass, str) else list(targetClass or target_classes(info)[:1])
        channels = [inputVolume, *channelVolumes]
        if len(channels) != len(info['channels']) or None in channels:
            missing = [n for n, v in zip(info['channels'], channels + [None] * len(info['channels'])) if v is None]
            raise ValueError(f'this model takes {len(info["channels"])} channel(s) ({", ".join(info["channels"])}); '
                             f'select a volume for {", ".join(missing) or "each of them and no more"}')
        ending = info['file_ending']
        if ending not in WRITABLE_ENDINGS:
            raise ValueError(f'this model reads {ending} files, which Slicer cannot write; run the core CLI on the '
                             f'original files instead')
        options = displayOptions or DisplayOptions()
        display.color_node_id(self.scene, options.colormap)  # an unknown colormap fails now, not after the run
        case = re.sub(r'[^A-Za-z0-9_-]+', '_', inputVolume.GetName()).strip('_') or 'volume'
        workdir = Path(tempfile.mkdtemp(prefix='NNUNetCAM-', dir=self.temp_root))
        try:
            mask = self._write_mask(workdir, ending, targetSegmentation, targetSegmentId, targetRoi, targetPoint,
                                    pointRadiusMm, inputVolume)
            out = Path(outputFolder) if outputFolder else workdir / 'output'
            if connection is not None:  # the case is written only if the server does not hold it
                content = volumes.CaseContent(channels, ending)

                def write_case() -> List[str]:
                    if not content.unchanged():
                        raise ValueError('the input volume changed while the run started; click Apply again')
                    return self._write_case(workdir, case, channels, ending)
                process = ServerRun(connection, content, write_case, mask, '.' if server == 'local' else modelFolder,
                                    {'folds': list(folds) if folds else None, 'tta': tta, 'classes': classes,
                                     'layers': list(layers) if layers else None, 'method': method}, out)
            else:
                self._write_case(workdir, case, channels, ending)
                process = self._core_process(workdir, out, mask, info, classes, method, device, layers, folds, tta,
                                             evaluate, evaluationSteps, foldSpread)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return self._start(process, workdir, out, case, inputVolume, info, method, options, evaluate, foldSpread,
                           wait, onProgress, onLog, onFinished, onError)

    def _core_process(self, workdir, out, mask, info, classes, method, device, layers, folds, tta, evaluate,
                      evaluationSteps, foldSpread) -> CoreProcess:
        """A core process for this run alone."""
        args = ['-i', workdir / 'input'] + (['--target-mask', mask] if mask else [])
        args += ['-o', out, '-m', info['folder'], '--target-class', *classes, '--method', method,
                 '-device', device, '--progress', 'json', '--overwrite']
        if layers:
            args += ['--target-layer', *layers]
        if folds:
            args += ['-f', *map(str, folds)]
        if not tta:
            args += ['--disable-tta']
        if evaluate:
            args += ['--evaluate'] + (['--eval-steps', evaluationSteps] if evaluationSteps else [])
        if foldSpread:
            args += ['--save-fold-spread']
        return CoreProcess(self.environment.command(*args), self.environment.env())

    def _start(self, process, workdir, out, case, inputVolume, info, method, options, evaluate, foldSpread, wait,
               onProgress, onLog, onFinished, onError):
        def load(sidecar: dict) -> CamResult:
            return self._load_results(sidecar, out, inputVolume, info, method, options)
        self.current = CamRun(process, workdir, out / f'{case}_cam.json', load, onProgress, onLog, onFinished, onError,
                              EVALUATION_STAGES if evaluate else FOLD_SPREAD_STAGES if foldSpread else STAGES)
        if wait:
            return self.current.wait(event_pump=self.event_pump)
        if self.scheduler is not None:
            self._schedule(self.current)
        return self.current

    def cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()

    def _restart_server_after(self, onError):
        """A local server that did not answer (it died or hangs) is stopped, so the next run starts a new one."""
        def report(message):
            if getattr(self.current.process, 'unreachable', False):
                self.localServer.shutdown()
            if onError:
                onError(message)
        return report

    def _schedule(self, run: CamRun) -> None:
        def tick():
            if run.poll():
                self.scheduler(100, tick)
        self.scheduler(100, tick)

    @staticmethod
    def _write_case(workdir: Path, case: str, channels, ending) -> List[str]:
        (workdir / 'input').mkdir()
        return [str(f) for f in volumes.write_case(workdir / 'input', channels, ending, case)]

    def _write_mask(self, workdir: Path, ending, segmentation, segment_id, roi, point, radius_mm,
                    reference) -> Optional[str]:
        """The target mask's file, or None."""
        if segmentation is None and roi is None and point is None:
            return None
        mask = workdir / f'target_mask{ending}'
        volumes.write_target_mask(self.scene, reference, mask, segmentation, segment_id, roi, point, radius_mm)
        return str(mask)

    def _load_results(self, sidecar: dict, out: Path, inputVolume, info: dict, method: str,
                      options: DisplayOptions) -> CamResult:
        name = inputVolume.GetName()
        added = []
        try:
            segmentation = volumes.load_segmentation(self.scene, out / sidecar['segmentation'], f'{name} segmentation',
                                                     inputVolume, info['labels'], info.get('regions'))
            added.append(segmentation)
            cams, notes = {}, []
            for label, file in sidecar['cams'].items():
                node = volumes.load_scalar(self.scene, out / file, f'{name} CAM {label} {method}', inputVolume)
                added.append(node)
                note = display.style_cam(self.scene, node, options.colormap, options.threshold)
                if options.color_legend:
                    display.add_color_legend(node, f'CAM {label}')
                cams[label] = node
                notes += [note] if note and note not in notes else []
            spread = {}
            for label, file in (sidecar.get('fold_spread') or {}).items():
                node = volumes.load_scalar(self.scene, out / file, f'{name} fold spread {label} {method}', inputVolume)
                added.append(node)
                display.style_cam(self.scene, node, options.colormap, 0.0)
                display.add_color_legend(node, f'fold spread {label}')
                spread[label] = node
            table = chart = None
            if evaluation.evaluations(sidecar):
                table = evaluation.add_table(self.scene, sidecar, f'{name} map evaluation', added)
                chart = evaluation.add_curves(self.scene, sidecar, f'{name} {method}', added)
                notes += evaluation.sanity_lines(sidecar)
            if chart is not None and self.plots_logic is not None:
                notes += self._show_chart(chart)  # first: in the app it may change the slice views
            first = next(iter(cams.values()))
            display.show_in_slice_views(self.scene, inputVolume, first, options.opacity)
            if options.volume_rendering:
                if self.volume_rendering_logic is None:
                    notes.append('volume rendering is not available here; skipped')
                else:
                    display.show_volume_rendering(self.scene, first, self.volume_rendering_logic, options.threshold)
        except Exception:
            for node in added:
                self.scene.RemoveNode(node)
            raise
        for label, stats in sidecar.get('classes', {}).items():
            if stats.get('raw_max') == 0:
                notes.append(f'{label}: no voxels were predicted as {label}, so its CAM is empty')
        return CamResult(segmentation, cams, sidecar, notes, table, chart, spread)

    def _show_chart(self, chart) -> List[str]:
        """The curves in the layout's plot view, if it has one. The user's layout is kept: ShowChartInLayout would
        switch to one with a plot view (vtkSlicerPlotsLogic.cxx), so it is called only where it switches nothing."""
        layout = self.scene.GetFirstNodeByClass('vtkMRMLLayoutNode')
        if layout is not None:
            current = layout.GetViewArrangement()
            if self.plots_logic.GetLayoutWithPlot(current) != current:
                return [f'the deletion and insertion curves are in the plot chart "{chart.GetName()}": choose a '
                        f'layout with a plot view to see them']
        self.plots_logic.ShowChartInLayout(chart)
        return []
