"""What the server holds and runs: models and cases (bounded, see cache.py), and the jobs, run one at a time by a
worker thread with the same progress events as `--progress json`."""
import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Union

import numpy as np
import torch
from fastapi import HTTPException, UploadFile
from pydantic import BaseModel, Field

from ..api import CamEngine, PreparedCase, _safe, _versions, run_cases
from ..client import ENDED
from ..errors import CamError, UsageError, one_line
from ..inputs import read_label
from ..layers import LayerCache, head_of
from ..model import MIN_STEP, describe_model, fold_networks, load_predictor, resolve_device, resolve_folds
from ..progress import Progress
from ..sliding_window import layer_outputs_bytes
from ..targets import predicted_mask
from ..tile_plan import MANY_TILES, tile_count
from .cache import Cache, Cases
from .regions import Region, draw_region
from .uploads import ENDINGS, check_image, ending_of

API = '/v1'
ID = re.compile(r'[0-9a-f]{16}')
MAX_NAME = 128  # characters of an upload's file name
NAME = r'[^\x00-\x1f/\\]+'  # an upload's file name: no control characters, no path
MODEL_ID = r'^[^\x00-\x1f]+$'  # a model's path under a --models folder


@dataclass
class Limits:
    """Every bound the server keeps (the `serve` flags)."""
    max_upload_mb: float = 512
    max_voxels: int = 512 * 512 * 2000
    max_tiles: int = MANY_TILES
    cache_mb: float = 4096
    uploads_mb: float = 8192
    case_ttl_s: float = 3600
    queue: int = 8
    abandon_s: float = 60
    max_streams: int = 32
    stream_s: float = 30
    retry_after_s: int = 2  # below uvicorn's keep-alive (serve sets it to 10 s): a retry finds its connection open


class ExplainRequest(BaseModel):
    model: str = Field(max_length=512, pattern=MODEL_ID)
    case: str = Field(max_length=64)
    name: Optional[str] = Field(None, max_length=MAX_NAME, pattern=r'^[A-Za-z0-9._-]+$',
                                description='names the outputs (default: the first upload\'s file name)')
    folds: Optional[List[Union[int, str]]] = Field(None, max_length=64)
    checkpoint: str = Field('checkpoint_final.pth', pattern=r'^[A-Za-z0-9_.-]+\.pth$')  # a file in fold_N/
    tta: bool = True
    step_size: float = Field(0.5, ge=MIN_STEP, le=1)
    classes: List[Union[int, str]] = Field(['1'], max_length=256)
    layers: Optional[List[str]] = Field(None, max_length=64)
    method: str = Field('gradcam', max_length=64)
    pooling: Optional[Literal['volume', 'tile']] = None
    region: Region = Region()


class Cancelled(Exception):
    pass


@dataclass
class Job:
    id: str
    request: ExplainRequest
    folder: Path       # the model's
    model: str         # its id
    out: Path
    cases: List[str]   # the cases it needs (its case, a mask region's): kept while it is queued or running
    scrub: Callable[[str], str] = str
    status: str = 'queued'  # queued, running, done, failed, cancelled
    events: list = field(default_factory=list)
    error: Optional[str] = None
    files: Dict[str, str] = field(default_factory=dict)
    reused: List[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    abandon_s: float = 60
    seen: float = field(default_factory=time.monotonic)  # the client's last look at the job, or its start

    def write(self, line: str) -> None:
        """Progress's stream: each event kept for the client (server paths as names); a job cancelled, or whose
        client stopped asking about it for `abandon_s`, stops at its next event."""
        if line.strip():
            self.events.append(json.loads(self.scrub(line)))
        self.check()

    def check(self) -> None:
        if time.monotonic() - self.seen > self.abandon_s:
            self.error = f'no client asked about the job for {self.abandon_s:g} s: abandoned'
            self.cancel.set()
        if self.cancel.is_set():
            raise Cancelled()

    def flush(self) -> None:
        pass

    def public(self) -> dict:
        return {'id': self.id, 'status': self.status, 'error': self.error, 'files': sorted(self.files),
                'reused': self.reused, 'events': len(self.events)}


def _tensor_bytes(*xs) -> int:
    return sum(x.nbytes if isinstance(x, (np.ndarray, torch.Tensor)) else 0 for x in xs)


def _model_bytes(predictor, networks) -> int:
    """A loaded model's memory: each fold's weights as nnU-Net keeps them and as networks."""
    weights = sum(_tensor_bytes(*sd.values()) for sd in predictor.list_of_parameters)
    return weights + sum(_tensor_bytes(*n.parameters(), *n.buffers()) for n in networks)


class Server:
    """Models, cases and jobs, and the worker that runs the jobs one at a time."""

    def __init__(self, roots: List[Path], device: str = 'cpu', limits: Optional[Limits] = None,
                 work: Optional[Path] = None):
        self.roots = [r.resolve() for r in roots]
        self.device, self.limits = resolve_device(device), limits or Limits()
        self.max_upload = int(self.limits.max_upload_mb * 1024 ** 2)
        # the pid in the name: a later server removes this folder if this process dies without doing so
        self.work = Path(work or tempfile.mkdtemp(prefix=f'nnunetcam-server-{os.getpid()}-'))
        # ('model', folder, folds, checkpoint) -> (predictor, networks); (case, folder) -> PreparedCase;
        # (case, model key) -> (stitched logits, their segmentation); (case, model key, layers) -> LayerCache
        self.data = Cache(int(self.limits.cache_mb * 1024 ** 2))
        self.cases = Cases(self.work / 'cases', int(self.limits.uploads_mb * 1024 ** 2), self.limits.case_ttl_s,
                           lambda cid: self.data.drop(lambda k: k[0] == cid))
        self.cases.folder.mkdir(parents=True, exist_ok=True)
        self.jobs: Dict[str, Job] = {}
        self.queue: 'queue.Queue[Job]' = queue.Queue(maxsize=self.limits.queue)
        self.streams = 0
        self.lock = threading.Lock()
        self.counters = {'uploads': 0, 'model_loads': 0, 'preprocessings': 0, 'jobs_run': 0, 'tiles_run': 0,
                         'forwards_from_layer_cache': 0}
        threading.Thread(target=self._worker, daemon=True).start()

    def close(self, wait_s: float = 5) -> None:
        """Cancel the jobs, let the running one stop (it does between tiles), and remove the server's files."""
        for job in list(self.jobs.values()):
            job.cancel.set()
        deadline = time.monotonic() + wait_s
        while any(j.status == 'running' for j in list(self.jobs.values())) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.work, ignore_errors=True)

    def scrub(self, text: str) -> str:
        """Server paths as what a client knows them by: files under the work folder by name, models by id."""
        text = re.sub(re.escape(str(self.work)) + r'[^\s\'",]*', lambda m: Path(m.group()).name, text)
        for root in self.roots:
            text = text.replace(str(root) + os.sep, '')
        return text

    # models
    def model_folder(self, model: str) -> Path:
        """A model id (its path under a root); anything outside the roots is refused."""
        inside = [f for f in ((root / model).resolve() for root in self.roots)
                  if any(f.is_relative_to(root) for root in self.roots)]
        if not inside:
            raise HTTPException(403, f'model {model!r} is outside the served model folders')
        for folder in inside:
            if (folder / 'plans.json').is_file():
                return folder
        raise HTTPException(404, f'no model {model!r} under the served model folders; GET {API}/models lists them')

    def model_id(self, folder: Path) -> str:
        return next(str(folder.relative_to(r)) for r in self.roots if folder.is_relative_to(r))

    def list_models(self) -> List[dict]:
        out = []
        for root in self.roots:
            for plans in sorted(root.rglob('plans.json')):
                folder = plans.parent
                if not (folder / 'dataset.json').is_file():
                    continue
                ds = json.loads((folder / 'dataset.json').read_text())
                out.append({'id': str(folder.relative_to(root)), 'info': json.loads(self.scrub(json.dumps(
                               describe_model(folder)))),
                            'configuration': folder.name.split('__')[-1],
                            'folds': sorted(p.parent.name[5:] for p in folder.glob('fold_*/checkpoint_final.pth')),
                            'labels': ds.get('labels', {}), 'file_ending': ds.get('file_ending'),
                            'channel_names': ds.get('channel_names', ds.get('modality', {}))})
        return out

    def _loaded(self, job: Job):
        """The job's model, loaded once and kept in the cache (counted in --cache-mb, least recently used dropped)."""
        r = job.request
        folds = tuple(resolve_folds(job.folder, r.folds and [str(f) for f in r.folds], r.checkpoint))
        key = ('model', str(job.folder), folds, r.checkpoint)
        loaded = self.data.get(key)
        if loaded is None:
            pred = load_predictor(job.folder, folds, r.checkpoint, self.device, r.step_size, r.tta)
            if pred.configuration_manager.previous_stage_name:
                raise UsageError('cascade models are not served yet; run them with the CLI or a new process per run')
            loaded = (pred, fold_networks(pred))
            self.data.put(key, loaded, _model_bytes(*loaded))
            self.counters['model_loads'] += 1
        else:
            job.reused.append('model')
        pred = loaded[0]
        pred.tile_step_size, pred.use_mirroring = r.step_size, r.tta  # one job at a time: set for this one
        return (*key[1:], r.tta, r.step_size), loaded

    def expected_tiles(self, folder: Path, case, step: float) -> int:
        """The tiles a job would run, from the model's plans and the case's header: at its target spacing before
        cropping, so never fewer than nnU-Net's."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        pm = PlansManager(str(folder / 'plans.json'))
        cm = pm.get_configuration(folder.name.split('__')[-1])
        size, spacing = np.array(case.size[::-1], float), np.array(case.spacing[::-1], float)  # numpy order
        if len(size) == 2:
            size, spacing = np.array([1, *size]), np.array([1, *spacing])
        size, spacing = size[pm.transpose_forward], spacing[pm.transpose_forward]
        target = np.array(cm.spacing if len(cm.spacing) == len(spacing) else [spacing[0], *cm.spacing], float)
        return tile_count(np.round(size * spacing / target).astype(int), cm.patch_size, step)

    # cases
    def add_case(self, files: List[UploadFile]) -> dict:
        """The files (one per channel) as a case: streamed to disk within --max-upload-mb, each checked from its
        header, then kept under the id of their contents (an upload of the same bytes returns that case)."""
        with self.lock:
            self.counters['uploads'] += 1
        if not files:
            raise HTTPException(422, 'upload one file per channel as "files"')
        names = [f.filename or '' for f in files]
        if any(len(n) > MAX_NAME or not re.fullmatch(NAME, n) for n in names):
            raise HTTPException(422, f'an upload\'s file name is a plain name of at most {MAX_NAME} characters; '
                                     f'rename the file')
        endings = {ending_of(n) for n in names}
        if None in endings or len(endings) != 1:
            raise HTTPException(422, f'files must share one image ending of {", ".join(ENDINGS)}')
        ending = endings.pop()
        name = _safe(re.sub(r'_\d{4}$', '', names[0][:-len(ending)])) or 'case'  # outputs as the CLI's
        staged = Path(tempfile.mkdtemp(prefix='upload-', dir=self.work))
        total, hashes, headers = 0, [], []
        try:
            for k, f in enumerate(files):
                path = staged / f'{name}_{k:04d}{ending}'
                digest = hashlib.sha256()
                with open(path, 'wb') as dst:
                    while chunk := f.file.read(1 << 20):
                        total += len(chunk)
                        if total > self.max_upload:
                            raise HTTPException(413, f'upload larger than --max-upload-mb '
                                                     f'{self.limits.max_upload_mb:g}')
                        digest.update(chunk)
                        dst.write(chunk)
                headers.append(check_image(path, ending, names[k], self.limits.max_voxels))
                hashes.append(digest.hexdigest())
            case, new = self.cases.add(staged, name, ending, hashes, total, headers[0])
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return {**case.public(), 'new': new}

    def case(self, case_id: str):
        case = self.cases.get(case_id) if ID.fullmatch(case_id) else None
        if case is None:
            raise HTTPException(404, f'no case {case_id!r}; upload it first')
        return case

    def find_case(self, ending: str, sha256: List[str]) -> dict:
        case = self.cases.find(ending, sha256)
        if case is None:
            raise HTTPException(404, 'no case with these contents; upload it')
        return case.public()

    def delete_case(self, case_id: str) -> None:
        self.case(case_id)
        self.cases.remove(case_id)

    def _prepared(self, job: Job, engine: CamEngine, progress: Progress) -> PreparedCase:
        key = (job.request.case, str(job.folder))
        pc = self.data.get(key)
        if pc is None:
            progress.stage('preprocess')
            data, props, _, image = engine.preprocess(self.case(job.request.case).files, check=job.check)
            pc = PreparedCase(data, props, image)
            self.data.put(key, pc, _tensor_bytes(data, image))
            self.counters['preprocessings'] += 1
        else:
            job.reused.append('preprocessed case')
        return pc

    def _region_mask(self, job: Job, engine: CamEngine, pc: PreparedCase) -> Optional[torch.Tensor]:
        """The region as a mask in the model's (preprocessed) space, read as a --target-mask would be."""
        region = job.request.region
        if region.kind in ('predicted', 'all'):
            return None
        rw = engine.predictor.plans_manager.image_reader_writer_class()
        if region.kind == 'mask':
            path = self.case(region.mask).files[0]
        else:
            case = self.case(job.request.case)
            path = draw_region(case.files[0], region, job.out.parent / f'{job.id}_region{case.ending}')
        m = read_label(rw, path, pc.properties, pc.image.shape, 'region') > 0
        if not m.any():
            raise UsageError('the region holds no voxel of the image; give a box, point or mask inside it')
        mask = torch.from_numpy(engine._to_preprocessed(m, pc.properties, pc.data.shape[1:]))
        if not mask.any():
            raise UsageError('the region vanishes at the model\'s spacing; make it larger')
        return mask

    # jobs
    def submit(self, request: ExplainRequest) -> Job:
        case = self.case(request.case)
        if request.region.kind == 'mask':
            if not request.region.mask:
                raise HTTPException(422, 'a mask region names the uploaded mask case as "mask"')
            self.case(request.region.mask)
        folder = self.model_folder(request.model)
        tiles = self.expected_tiles(folder, case, request.step_size)
        if tiles > self.limits.max_tiles:
            raise HTTPException(422, f'this case needs about {tiles} tiles at step_size {request.step_size:g}, more '
                                     f'than --max-tiles {self.limits.max_tiles}; use a larger step_size (nnU-Net '
                                     f'uses 0.5)')
        job_id = secrets.token_hex(8)
        job = Job(job_id, request, folder, self.model_id(folder), self.work / 'jobs' / job_id / 'out',
                  [request.case] + ([request.region.mask] if request.region.kind == 'mask' else []), self.scrub,
                  abandon_s=self.limits.abandon_s)
        with self.cases.lock:
            for cid in job.cases:
                self.case(cid).jobs += 1
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self._release(job)
            raise HTTPException(503, 'the server is busy: too many queued jobs; retry later',
                                headers={'Retry-After': str(self.limits.retry_after_s)}) from None
        self.jobs[job_id] = job
        return job

    def _release(self, job: Job) -> None:
        with self.cases.lock:
            for cid in job.cases:
                case = self.cases.items.get(cid)
                if case is not None:
                    case.jobs, case.used = case.jobs - 1, time.monotonic()  # its lifetime counts from here

    def forget(self, job_id: str) -> Job:
        """Cancel a job; one that has ended is removed with its files."""
        job = self.job(job_id)
        job.cancel.set()
        if job.status in ENDED and self.jobs.pop(job_id, None) is not None:
            shutil.rmtree(job.out.parent, ignore_errors=True)
        return job

    def job(self, job_id: str) -> Job:
        if not ID.fullmatch(job_id) or job_id not in self.jobs:
            raise HTTPException(404, f'no job {job_id!r}')
        self.jobs[job_id].seen = time.monotonic()
        return self.jobs[job_id]

    def _worker(self) -> None:
        while True:
            job = self.queue.get()
            if job.cancel.is_set():
                job.status = 'cancelled'
                self._release(job)
                continue
            job.status, job.seen = 'running', time.monotonic()
            try:
                self._run(job)
                status = 'done'
            except Cancelled:
                status = 'cancelled'
            except CamError as e:
                status, job.error = 'failed', self.scrub(str(e))
            except BaseException as e:  # the same one line as the CLI's; the server (this worker) goes on
                status, job.error = 'failed', self.scrub(one_line(e))
            self._release(job)
            self.counters['jobs_run'] += 1
            if status != 'done':  # nothing partial left behind
                shutil.rmtree(job.out.parent, ignore_errors=True)
            if status == 'failed':
                job.events.append({'event': 'error', 'message': job.error})
            job.status = status  # last: a job seen ended has all its events and files

    def _inputs(self, job: Job) -> List[str]:
        """The case's files under the request's name (links in the job's folder): outputs are named after them."""
        case = self.case(job.request.case)
        name = job.request.name or case.name
        folder = job.out.parent / 'in'
        folder.mkdir(parents=True, exist_ok=True)
        links = []
        for k, f in enumerate(case.files):
            links.append(folder / f'{name}_{k:04d}{case.ending}')
            os.link(f, links[-1])
        return [str(p) for p in links]

    def _run(self, job: Job) -> None:
        r = job.request
        job.out.parent.mkdir(parents=True, exist_ok=True)
        progress = Progress('json', stream=job)  # a cancel is seen at each stage and tile
        progress.stage('load')
        key, (pred, networks) = self._loaded(job)
        engine = CamEngine(pred, r.layers, r.classes, r.method, r.pooling,
                           'all' if r.region.kind == 'all' else 'predicted', networks=networks)
        pc = self._prepared(job, engine, progress)
        job.check()
        mask = self._region_mask(job, engine, pc)
        logits_key = (r.case, key)
        logits, seg = (self.data.get(logits_key) if r.region.kind != 'all' else None) or (None, None)
        target_mask = 'region' if mask is not None else 'tile ensemble'
        if logits is not None and mask is None:
            # each class over its voxels in the cached stitched segmentation: tiles without any run no more
            mask = predicted_mask(logits, engine.targets, pred.label_manager.has_regions)
            target_mask = 'stitched segmentation'
            if not mask.any():
                mask, logits, seg, target_mask = None, None, None, 'tile ensemble'
        if logits is not None:
            job.reused.append('stitched logits: only the tiles with target voxels ran')
        layers_key = (r.case, key, tuple(engine.layers))
        layer_cache = self.data.get(layers_key)
        if layer_cache is not None:
            job.reused.append('target-layer outputs: the segmentation layer alone made the logits and gradients')
        elif head_of(networks[0], engine.layers) is not None:
            # what the case and its logits leave, at most half the cache, made room for before the run
            heads = networks[0].decoder.seg_layers[-1].out_channels
            case_bytes = _tensor_bytes(pc.data, pc.image) + (_tensor_bytes(logits, seg) if logits is not None
                                                              else pc.data[0].nelement() * (4 * heads + 1))
            need = min(layer_outputs_bytes(pred, networks, pc.data.shape[1:]), self.data.limit // 2,
                       self.data.limit - case_bytes)
            if need > 0:
                layer_cache = LayerCache(engine.layers[0], need)
                self.data.reserve(need)
        prepared = PreparedCase(pc.data, pc.properties, pc.image, mask, logits, seg, layer_cache)
        inputs = self._inputs(job)
        results = run_cases(engine, inputs, job.out, prepared=prepared, progress=progress,
                            run_info={'model': job.model, 'folds': list(key[1]), 'checkpoint': r.checkpoint,
                                      'server': {'reused': job.reused, 'region': r.region.model_dump(),
                                                 'target_mask': target_mask}})
        res = next(iter(results.values()))
        self.counters['tiles_run'] += res.info['tiles']
        self.counters['forwards_from_layer_cache'] += res.info['forwards_from_layer_cache']
        if layer_cache is not None and layer_cache.outputs:
            self.data.put(layers_key, layer_cache, layer_cache.budget)  # its block, allocated whole
        if logits is None:
            self.data.put(logits_key, (res.logits, res.segmentation), _tensor_bytes(res.logits, res.segmentation))
        for sidecar in job.out.glob('*_cam.json'):  # the inputs by their names, not the server's paths
            s = json.loads(sidecar.read_text())
            s['inputs'] = [Path(f).name for f in inputs]
            sidecar.write_text(json.dumps(s, indent=2))
        job.files = {p.name: str(p) for p in job.out.iterdir()}

    def health(self) -> dict:
        self.cases.expire()
        return {'versions': _versions(), 'device': str(self.device),
                'devices': ['cpu'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())],
                'models_loaded': [{'model': self.model_id(Path(k[1])), 'folds': list(k[2]), 'checkpoint': k[3]}
                                  for k in self.data.keys() if k[0] == 'model'],
                'cases': len(self.cases), 'uploads_bytes': self.cases.bytes(),
                'uploads_limit_bytes': self.cases.limit, 'cache_bytes': self.data.bytes(),
                'cache_limit_bytes': self.data.limit, 'queued': self.queue.qsize(), 'streams': self.streams,
                'limits': vars(self.limits), 'counters': dict(self.counters)}
