"""`nnunetv2_cam serve`: an HTTP server over CamEngine. Models and cases stay loaded; explanations run as jobs, one
at a time, with the same progress events as `--progress json`; a region is re-explained from the tiles that overlap
it alone, on the cached case and the cached stitched logits; at the last decoder stage another class or method
needs no forward pass (the layer's outputs are kept).

Safe by default: loopback only, a bearer token on every request, model folders only under `--models` roots, opaque
ids, bounded uploads, cache and queue.
"""
import argparse
import asyncio
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Union

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from .api import CamEngine, PreparedCase, _safe, _versions, run_cases
from .client import ENDED
from .errors import CamError, UsageError, one_line
from .inputs import read_label
from .layers import LayerCache, head_of
from .model import describe_model, fold_networks, load_predictor, resolve_device, resolve_folds
from .progress import Progress
from .sliding_window import layer_outputs_bytes
from .targets import predicted_mask

API = '/v1'
ID = re.compile(r'[0-9a-f]{16}')
ENDINGS = ('.nii.gz', '.nii', '.nrrd', '.mha', '.png', '.tif', '.tiff')  # one file each: no detached headers


class Region(BaseModel):
    """Which voxels to explain. predicted/all: the whole case; mask: an uploaded case holding a mask; box/point:
    in voxel indices (i, j, k) of the uploaded image, or in RAS millimetres."""
    kind: Literal['predicted', 'all', 'mask', 'box', 'point'] = 'predicted'
    mask: Optional[str] = None
    box: Optional[List[List[float]]] = Field(None, description='[[lo...], [hi...]], both inclusive')
    point: Optional[List[float]] = None
    radius_mm: float = Field(10, gt=0)
    space: Literal['voxel', 'ras'] = 'voxel'


def region_array(region: Region, size, spacing: np.ndarray, corners: List[np.ndarray]) -> np.ndarray:
    """A box (two corners) or a ball (its centre) in continuous voxel indices (i, j, k) on an image of `size`, as
    uint8 in numpy's order (k, j, i). Drawn inside its bounding box alone: a full-size grid costs a CT half a second."""
    if region.kind == 'box':
        a, b = corners
        lo, hi = np.floor(np.minimum(a, b) + 0.5), np.floor(np.maximum(a, b) + 0.5)  # both inclusive
    else:
        reach = region.radius_mm / spacing
        lo, hi = np.floor(corners[0] - reach), np.ceil(corners[0] + reach)
    start = np.clip(lo, 0, size).astype(int)
    stop = np.clip(hi + 1, 0, size).astype(int)
    out = np.zeros(tuple(size)[::-1], np.uint8)
    if (stop <= start).any():
        return out
    block = tuple(slice(a, b) for a, b in zip(start, stop))
    if region.kind == 'box':
        inside = 1
    else:
        d2 = sum(((x - c) * sp) ** 2 for x, c, sp in zip(np.ogrid[block], corners[0], spacing))
        inside = (d2 <= region.radius_mm ** 2).transpose()
    out[block[::-1]] = inside
    return out


class ExplainRequest(BaseModel):
    model: str
    case: str
    folds: Optional[List[Union[int, str]]] = None
    checkpoint: str = Field('checkpoint_final.pth', pattern=r'^[A-Za-z0-9_.-]+\.pth$')  # a file in fold_N/
    tta: bool = True
    step_size: float = Field(0.5, gt=0, le=1)
    classes: List[Union[int, str]] = ['1']
    layers: Optional[List[str]] = None
    method: str = 'gradcam'
    pooling: Optional[Literal['volume', 'tile']] = None
    region: Region = Region()


class Cancelled(Exception):
    pass


@dataclass
class Job:
    id: str
    request: ExplainRequest
    folder: Path
    out: Path
    status: str = 'queued'  # queued, running, done, failed, cancelled
    events: list = field(default_factory=list)
    error: Optional[str] = None
    files: Dict[str, str] = field(default_factory=dict)
    reused: List[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    abandon_s: float = 60
    seen: float = field(default_factory=time.monotonic)  # the client's last look at the job, or its start

    def write(self, line: str) -> None:
        """Progress's stream: each event kept for the client; a job cancelled, or whose client stopped asking
        about it for `abandon_s`, stops at its next event."""
        if line.strip():
            self.events.append(json.loads(line))
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


class Cache:
    """Least recently used entries, bounded by bytes."""

    def __init__(self, limit_bytes: int):
        self.limit, self.items, self.lock = limit_bytes, OrderedDict(), threading.RLock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
        return None

    def put(self, key, value, nbytes: int) -> None:
        """The entry stays, even one over the limit alone."""
        with self.lock:
            self.items.pop(key, None)
            self.reserve(nbytes)
            self.items[key] = (value, nbytes)

    def reserve(self, nbytes: int) -> None:
        """Room for nbytes more, the least recently used dropped first."""
        with self.lock:
            while self.items and self.bytes() + nbytes > self.limit:
                self.items.popitem(last=False)

    def drop(self, match) -> None:
        with self.lock:
            for key in [k for k in self.items if match(k)]:
                del self.items[key]

    def bytes(self) -> int:
        with self.lock:
            return sum(n for _, n in self.items.values())


def _tensor_bytes(*xs) -> int:
    return sum(x.nbytes if isinstance(x, (np.ndarray, torch.Tensor)) else 0 for x in xs)


class Server:
    """What the server holds: models, cases, jobs, and the worker that runs the jobs one at a time."""

    def __init__(self, roots: List[Path], token: str, device: str = 'cpu', max_upload_mb: float = 1024,
                 cache_mb: float = 4096, queue_size: int = 8, abandon_s: float = 60, work: Optional[Path] = None):
        self.roots = [r.resolve() for r in roots]
        self.token, self.device = token, resolve_device(device)
        self.max_upload, self.abandon_s = int(max_upload_mb * 1024 ** 2), abandon_s
        self.work = Path(work or tempfile.mkdtemp(prefix='nnunetcam-server-'))
        self.cases: Dict[str, dict] = {}
        self.models: Dict[tuple, tuple] = {}  # (folder, folds, checkpoint) -> (predictor, networks)
        # (case, folder) -> PreparedCase; (case, model key) -> (stitched logits, their segmentation);
        # (case, model key, layers) -> LayerCache
        self.data = Cache(int(cache_mb * 1024 ** 2))
        self.jobs: Dict[str, Job] = {}
        self.queue: 'queue.Queue[Job]' = queue.Queue(maxsize=queue_size)
        self.counters = {'model_loads': 0, 'preprocessings': 0, 'jobs_run': 0, 'tiles_run': 0,
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

    # models
    def model_folder(self, model: str) -> Path:
        """A model id (its path under a root) or path; anything outside the roots is refused."""
        inside = [f for f in ((root / model).resolve() for root in self.roots)
                  if any(f.is_relative_to(root) for root in self.roots)]
        if not inside:
            raise HTTPException(403, f'model {model!r} is outside the served model folders')
        for folder in inside:
            if (folder / 'plans.json').is_file():
                return folder
        raise HTTPException(404, f'no model {model!r} under the served model folders; GET {API}/models lists them')

    def list_models(self) -> List[dict]:
        out = []
        for root in self.roots:
            for plans in sorted(root.rglob('plans.json')):
                folder = plans.parent
                if not (folder / 'dataset.json').is_file():
                    continue
                ds = json.loads((folder / 'dataset.json').read_text())
                out.append({'id': str(folder.relative_to(root)) if len(self.roots) == 1 else str(folder),
                            'info': describe_model(folder),
                            'configuration': folder.name.split('__')[-1],
                            'folds': sorted(p.parent.name[5:] for p in folder.glob('fold_*/checkpoint_final.pth')),
                            'labels': ds.get('labels', {}), 'file_ending': ds.get('file_ending'),
                            'channel_names': ds.get('channel_names', ds.get('modality', {}))})
        return out

    def _loaded(self, job: Job):
        r = job.request
        folds = tuple(resolve_folds(job.folder, r.folds and [str(f) for f in r.folds], r.checkpoint))
        key = (str(job.folder), folds, r.checkpoint)
        if key not in self.models:
            pred = load_predictor(job.folder, folds, r.checkpoint, self.device, r.step_size, r.tta)
            if pred.configuration_manager.previous_stage_name:
                raise UsageError('cascade models are not served yet; run them with the CLI or a new process per run')
            self.models[key] = (pred, fold_networks(pred))
            self.counters['model_loads'] += 1
        else:
            job.reused.append('model')
        pred = self.models[key][0]
        pred.tile_step_size, pred.use_mirroring = r.step_size, r.tta  # one job at a time: set for this one
        return (*key, r.tta, r.step_size), self.models[key]

    # cases
    def add_case(self, files: List[UploadFile]) -> dict:
        if not files:
            raise HTTPException(422, 'upload one file per channel as "files"')
        endings = {next((e for e in ENDINGS if (f.filename or '').lower().endswith(e)), None) for f in files}
        if None in endings or len(endings) != 1:
            raise HTTPException(422, f'files must share one image ending of {", ".join(ENDINGS)}')
        ending = endings.pop()
        name = _safe(re.sub(r'_\d{4}$', '', files[0].filename[:-len(ending)])) or 'case'  # outputs as the CLI's
        case_id = secrets.token_hex(8)
        folder = self.work / 'cases' / case_id
        folder.mkdir(parents=True)
        total = 0
        try:
            paths = []
            for k, f in enumerate(files):
                path = folder / f'{name}_{k:04d}{ending}'
                with open(path, 'wb') as dst:
                    while chunk := f.file.read(1 << 20):
                        total += len(chunk)
                        if total > self.max_upload:
                            raise HTTPException(413, f'upload larger than --max-upload-mb '
                                                     f'{self.max_upload / 1024 ** 2:g}')
                        dst.write(chunk)
                paths.append(str(path))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.cases[case_id] = {'name': name, 'files': paths, 'ending': ending, 'bytes': total}
        return {'id': case_id, 'name': name, 'channels': len(paths), 'bytes': total}

    def case(self, case_id: str) -> dict:
        if not ID.fullmatch(case_id) or case_id not in self.cases:
            raise HTTPException(404, f'no case {case_id!r}; upload it first')
        return self.cases[case_id]

    def delete_case(self, case_id: str) -> None:
        self.case(case_id)
        self.cases.pop(case_id, None)
        self.data.drop(lambda k: k[0] == case_id)
        shutil.rmtree(self.work / 'cases' / case_id, ignore_errors=True)

    def _prepared(self, job: Job, engine: CamEngine) -> PreparedCase:
        key = (job.request.case, str(job.folder))
        pc = self.data.get(key)
        if pc is None:
            data, props, _, image = engine.preprocess(self.case(job.request.case)['files'])
            pc = PreparedCase(data, props, image)
            if job.request.case in self.cases:  # not deleted meanwhile
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
            if not region.mask:
                raise UsageError('a mask region names the uploaded mask case as "mask"')
            path = self.case(region.mask)['files'][0]
        else:
            path = self._draw_region(job, region)
        m = read_label(rw, path, pc.properties, pc.image.shape, 'region') > 0
        if not m.any():
            raise UsageError('the region holds no voxel of the image; give a box, point or mask inside it')
        mask = torch.from_numpy(engine._to_preprocessed(m, pc.properties, pc.data.shape[1:]))
        if not mask.any():
            raise UsageError('the region vanishes at the model\'s spacing; make it larger')
        return mask

    def _draw_region(self, job: Job, region: Region) -> str:
        """A box or ball drawn on the uploaded image's grid, written next to it in its format."""
        import SimpleITK as sitk
        case = self.case(job.request.case)
        reader = sitk.ImageFileReader()
        reader.SetFileName(case['files'][0])
        reader.ReadImageInformation()  # the geometry alone: no voxels read
        size = np.array(reader.GetSize())
        img = sitk.Image([1] * len(size), sitk.sitkUInt8)  # the index <-> physical transform does not need the size
        img.SetOrigin(reader.GetOrigin())
        img.SetSpacing(reader.GetSpacing())
        img.SetDirection(reader.GetDirection())

        def index(p):
            p = [float(v) for v in p]
            if len(p) != img.GetDimension():
                raise UsageError(f'a {img.GetDimension()}D image needs {img.GetDimension()} coordinates, got {len(p)}')
            if region.space == 'voxel':
                return np.array(p)
            lps = [-p[0], -p[1], *p[2:]]  # RAS -> ITK's LPS
            return np.array(img.TransformPhysicalPointToContinuousIndex(lps))

        if region.kind == 'box' and (not region.box or len(region.box) != 2):
            raise UsageError('a box region is [[lo...], [hi...]]')
        if region.kind == 'point' and not region.point:
            raise UsageError('a point region gives "point" and "radius_mm"')
        corners = [index(p) for p in (region.box if region.kind == 'box' else [region.point])]
        inside = region_array(region, size, np.array(img.GetSpacing()), corners)
        out = sitk.GetImageFromArray(inside)
        out.SetOrigin(img.GetOrigin())
        out.SetSpacing(img.GetSpacing())
        out.SetDirection(img.GetDirection())
        path = job.out.parent / f'{job.id}_region{case["ending"]}'
        sitk.WriteImage(out, str(path), True)
        return str(path)

    # jobs
    def submit(self, request: ExplainRequest) -> Job:
        self.case(request.case)
        if request.region.kind == 'mask' and request.region.mask:
            self.case(request.region.mask)
        job_id = secrets.token_hex(8)
        job = Job(job_id, request, self.model_folder(request.model), self.work / 'jobs' / job_id / 'out',
                  abandon_s=self.abandon_s)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise HTTPException(503, 'the server is busy: too many queued jobs; retry later',
                                headers={'Retry-After': '5'}) from None
        self.jobs[job_id] = job
        return job

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
                continue
            job.status, job.seen = 'running', time.monotonic()
            try:
                self._run(job)
                status = 'done'
            except Cancelled:
                status = 'cancelled'
            except CamError as e:
                status, job.error = 'failed', str(e)
            except BaseException as e:  # the same one line as the CLI's; the server (this worker) goes on
                status, job.error = 'failed', one_line(e)
            self.counters['jobs_run'] += 1
            if status != 'done':  # nothing partial left behind
                shutil.rmtree(job.out.parent, ignore_errors=True)
            if status == 'failed':
                job.events.append({'event': 'error', 'message': job.error})
            job.status = status  # last: a job seen ended has all its events and files

    def _run(self, job: Job) -> None:
        r = job.request
        job.out.parent.mkdir(parents=True, exist_ok=True)
        key, (pred, networks) = self._loaded(job)
        engine = CamEngine(pred, r.layers, r.classes, r.method, r.pooling,
                           'all' if r.region.kind == 'all' else 'predicted', networks=networks)
        pc = self._prepared(job, engine)
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
        progress = Progress('json', stream=job)
        results = run_cases(engine, self.case(r.case)['files'], job.out, prepared=prepared, progress=progress,
                            run_info={'model': str(job.folder), 'folds': list(key[1]), 'checkpoint': r.checkpoint,
                                      'server': {'reused': job.reused, 'region': r.region.model_dump(),
                                                 'target_mask': target_mask}})
        res = results[self.case(r.case)['name']]
        self.counters['tiles_run'] += res.info['tiles']
        self.counters['forwards_from_layer_cache'] += res.info['forwards_from_layer_cache']
        if layer_cache is not None and layer_cache.outputs and r.case in self.cases:
            self.data.put(layers_key, layer_cache, layer_cache.budget)  # its block, allocated whole
        if logits is None and r.case in self.cases:
            self.data.put(logits_key, (res.logits, res.segmentation),
                          _tensor_bytes(res.logits, res.segmentation))
        job.files = {p.name: str(p) for p in job.out.iterdir()}

    def health(self) -> dict:
        return {'versions': _versions(), 'device': str(self.device),
                'devices': ['cpu'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())],
                'models_loaded': [{'model': k[0], 'folds': list(k[1]), 'checkpoint': k[2]} for k in list(self.models)],
                'cases': len(self.cases), 'cache_bytes': self.data.bytes(), 'cache_limit_bytes': self.data.limit,
                'queued': self.queue.qsize(), 'counters': dict(self.counters)}


def create_app(server: Server) -> FastAPI:
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                             server.token.encode()):
            raise HTTPException(401, 'a valid bearer token is required', headers={'WWW-Authenticate': 'Bearer'})

    def upload_size(request: Request) -> None:
        length = request.headers.get('content-length')
        if length is not None and length.isdigit() and int(length) > server.max_upload + (1 << 16):
            raise HTTPException(413, f'upload larger than --max-upload-mb {server.max_upload / 1024 ** 2:g}')

    # no docs routes: FastAPI adds them without the app's dependencies, so they would answer without the token;
    # bodies are bounded before they are read (the token is checked after)
    app = FastAPI(title='NNUNetCAM explanation server', dependencies=[Depends(authorised)], docs_url=None,
                  redoc_url=None, openapi_url=None, max_body_size=1 << 20)

    @app.get(f'{API}/health')
    def health():
        return server.health()

    @app.get(f'{API}/models')
    def models():
        return server.list_models()

    @app.post(f'{API}/cases', dependencies=[Depends(upload_size)], max_body_size=server.max_upload + (1 << 16))
    def upload(files: List[UploadFile] = File(...)):
        return server.add_case(files)

    @app.delete(f'{API}/cases/{{case_id}}')
    def delete_case(case_id: str):
        server.delete_case(case_id)
        return {'deleted': case_id}

    @app.post(f'{API}/explain')
    def explain(request: ExplainRequest):
        return server.submit(request).public()

    @app.get(f'{API}/jobs/{{job_id}}')
    def job(job_id: str):
        return server.job(job_id).public()

    @app.get(f'{API}/jobs/{{job_id}}/events')
    def events(job_id: str, since: int = Query(0, ge=0)):
        return server.job(job_id).events[since:]

    @app.get(f'{API}/jobs/{{job_id}}/stream', response_class=EventSourceResponse)
    async def stream(job: Job = Depends(server.job), since: int = Query(0, ge=0),
                     last_event_id: Optional[int] = Header(None, ge=0)):
        """The job's events from `since` (or after a reconnecting browser's Last-Event-ID) on as server-sent events
        (`id`: the event's index), until it ends."""
        if last_event_id is not None:
            since = max(since, last_event_id + 1)
        while True:
            job.seen = time.monotonic()  # a client listens: not abandoned
            ended = job.status in ENDED
            for event in job.events[since:]:
                yield ServerSentEvent(data=event, id=str(since))
                since += 1
            if ended:
                return
            await asyncio.sleep(0.05)

    @app.get(f'{API}/jobs/{{job_id}}/files/{{name}}')
    def result_file(job_id: str, name: str):
        files = server.job(job_id).files
        if name not in files:
            raise HTTPException(404, f'no file {name!r} in this job\'s results')
        return FileResponse(files[name])

    @app.delete(f'{API}/jobs/{{job_id}}')
    def cancel(job_id: str):
        """Cancel a running or queued job; forget an ended one and its files."""
        return server.forget(job_id).public()

    return app


def _token(path: Path, explicit: bool) -> tuple:
    """(token, new): the token in `path`, or a new random one written there readable by the user alone."""
    if path.is_file():
        token = path.read_text().strip()
        if len(token) < 16:
            raise UsageError(f'the token in {path} is shorter than 16 characters; use a longer random one')
        return token, False
    if explicit:
        raise UsageError(f'no token file {path}; a server reachable from other hosts needs a token you made '
                         f'(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))" > {path})')
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(token + '\n')
    return token, True


def _alive(pid: int) -> bool:
    if os.name == 'nt':  # os.kill(pid, 0) would send CTRL_C there
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _exit_with(pid: int, server: Server) -> None:
    """No orphans: when the process that started the server has gone, leave at once."""
    while True:
        if not _alive(pid):
            server.close()
            os._exit(0)
        time.sleep(0.5)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='nnunetv2_cam serve', description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', type=Path, required=True, help='the folders whose models may be used')
    p.add_argument('--host', default='127.0.0.1', help='default: loopback only')
    p.add_argument('--port', type=int, default=8765, help='0 picks a free port (printed)')
    p.add_argument('--token-file', type=Path, default=None,
                   help='bearer token file (default: a new random token in a 0600 file under the cache)')
    p.add_argument('-device', default='auto')
    p.add_argument('--max-upload-mb', type=float, default=1024)
    p.add_argument('--cache-mb', type=float, default=4096, help='preprocessed cases, logits and layer outputs kept (LRU)')
    p.add_argument('--queue', type=int, default=8, help='jobs waiting at most; more get 503')
    p.add_argument('--abandon-s', type=float, default=60,
                   help='cancel a running job whose client has not asked about it for this long (default: 60)')
    p.add_argument('--parent-pid', type=int, help='exit when this process ends (the Slicer that started it)')
    p.add_argument('--ssl-certfile')
    p.add_argument('--ssl-keyfile')
    args = p.parse_args(argv)
    import uvicorn
    try:
        for m in args.models:
            if not m.is_dir():
                raise UsageError(f'--models {m} is not a folder')
        loopback = args.host in ('127.0.0.1', 'localhost', '::1')
        if not loopback and args.token_file is None:
            raise UsageError(f'--host {args.host} serves other computers: give --token-file with a token you made')
        token_file = args.token_file or Path(os.environ.get('NNUNETCAM_CACHE', Path.home() / '.cache' / 'nnunetcam'),
                                             'server-token')
        token, new = _token(token_file, explicit=not loopback)
        server = Server(args.models, token, args.device, args.max_upload_mb, args.cache_mb, args.queue,
                        args.abandon_s)
    except CamError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
    if not loopback and not args.ssl_certfile:
        print('warning: serving other hosts without TLS: the token and images cross the network in clear; '
              'pass --ssl-certfile and --ssl-keyfile', file=sys.stderr)
    sock = socket.socket(socket.AF_INET6 if ':' in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        server.close()
        print(f'error: cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port, or 0 for a free '
              f'one', file=sys.stderr)
        return 2
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    scheme = 'https' if args.ssl_certfile else 'http'
    host = f'[{args.host}]' if ':' in args.host else args.host
    print(json.dumps({'event': 'listening', 'url': f'{scheme}://{host}:{sock.getsockname()[1]}',
                      'token_file': str(token_file), 'work': str(server.work),
                      **({'token': token} if new else {})}), flush=True)
    if args.parent_pid:
        threading.Thread(target=_exit_with, args=(args.parent_pid, server), daemon=True).start()
    # a client listening to a job's events holds its connection open: shutdown waits 2 s for it, not the job
    config = uvicorn.Config(create_app(server), log_level='warning', ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, timeout_graceful_shutdown=2)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again under the handler it found: make that handler
    # an exit that runs the cleanup below, not the default one that ends the process on the spot
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.close()
    return 0
