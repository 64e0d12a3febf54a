"""A small client of `nnunetv2_cam serve`."""
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import CamError, UsageError

ENDED = ('done', 'failed', 'cancelled')
ENDINGS = ('.nii.gz', '.nii', '.nrrd', '.mha', '.png', '.tif', '.tiff')  # what a server takes: one file each
BUSY_RETRIES = 15  # a busy server (503: queue or streams full) is asked again, after its Retry-After, this often


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ServerClient:
    def __init__(self, url: str, token: str, timeout: float = 60, busy_retries: int = BUSY_RETRIES):
        self.url, self.timeout = url.rstrip('/') + '/v1', timeout
        self.session = requests.Session()
        self.session.headers['Authorization'] = f'Bearer {token}'
        # 503 only (never a lost connection, which may have submitted the job): after Retry-After, else backoff
        retry = Retry(total=None, connect=0, read=0, redirect=0, other=0, status=busy_retries,
                      status_forcelist=[503], allowed_methods=None, backoff_factor=0.5, backoff_max=30,
                      respect_retry_after_header=True, raise_on_status=False)
        self.session.mount('http://', HTTPAdapter(max_retries=retry))
        self.session.mount('https://', HTTPAdapter(max_retries=retry))
        self.busy_retries = busy_retries

    def _call(self, method: str, path: str, missing_ok: bool = False, **kwargs):
        """The response; a CamError with the server's one line for an error (None for a 404 if `missing_ok`)."""
        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise CamError(f'the explanation server at {self.url[:-3]} does not answer ({type(e).__name__}); check '
                           f'that it runs and the URL') from None
        if r.status_code == 404 and missing_ok:
            return None
        if r.status_code >= 400:
            detail = r.json().get('detail') if r.headers.get('content-type', '').startswith('application/json') \
                else r.text
            if r.status_code == 503:
                detail = f'{detail} (still busy after {self.busy_retries} retries)'
            raise CamError(f'server: {r.status_code} {detail}')
        return r

    def health(self) -> dict:
        return self._call('GET', '/health').json()

    def models(self) -> List[dict]:
        return self._call('GET', '/models').json()

    def upload(self, files: Sequence[str]) -> str:
        """One file per channel, in channel order; returns the case id (the same for the same bytes)."""
        handles = [open(f, 'rb') for f in files]
        try:
            return self._call('POST', '/cases', files=[('files', (Path(f).name, h)) for f, h in
                                                       zip(files, handles)]).json()['id']
        finally:
            for h in handles:
                h.close()

    def find_case(self, files: Sequence[str]) -> Optional[str]:
        """The id of the server's case holding these files' bytes (sha256 of each), or None."""
        ending = next((e for e in ENDINGS if str(files[0]).lower().endswith(e)), Path(files[0]).suffix)
        found = self._call('GET', '/cases', missing_ok=True,
                           params={'ending': ending, 'sha256': [sha256_of(f) for f in files]})
        return found and found.json()['id']

    def has_case(self, case_id: str) -> bool:
        """Whether the server still holds the case (it drops unused ones: --uploads-mb, --case-ttl-s)."""
        return self._call('GET', f'/cases/{case_id}', missing_ok=True) is not None

    def case_for(self, files: Sequence[str]) -> Tuple[str, bool]:
        """(case id, reused): the server's case with these bytes, uploaded only if it has none."""
        case = self.find_case(files)
        return (case, True) if case else (self.upload(files), False)

    def delete_case(self, case_id: str) -> None:
        self._call('DELETE', f'/cases/{case_id}')

    def explain(self, model: str, case: str, **request) -> str:
        """Returns the job id; `request` holds ExplainRequest's other fields."""
        return self._call('POST', '/explain', json={'model': model, 'case': case, **request}).json()['id']

    def wait(self, job_id: str, on_event: Optional[Callable[[dict], None]] = None) -> dict:
        """Until the job ends, passing each progress event on as the server streams it (a dropped stream is taken
        up where it stopped); returns the job (status, error, files)."""
        seen = 0
        while True:
            try:
                with self._call('GET', f'/jobs/{job_id}/stream', params={'since': seen}, stream=True) as r:
                    for line in r.iter_lines(decode_unicode=True):
                        if line.startswith('data:'):
                            seen += 1
                            if on_event:
                                on_event(json.loads(line[5:]))
            except requests.RequestException:  # the stream dropped: ask for the job, then listen again
                time.sleep(0.2)
            job = self._call('GET', f'/jobs/{job_id}').json()
            if job['status'] in ENDED and seen >= job['events']:
                return job

    def cancel(self, job_id: str) -> None:
        """Cancel a running or queued job; remove an ended one and its files from the server."""
        self._call('DELETE', f'/jobs/{job_id}')

    def download(self, job_id: str, folder: Path, names: Sequence[str]) -> Dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for name in names:
            if name != Path(name).name:
                raise CamError(f'the server named a result {name!r}, which is not a plain file name')
            out[name] = folder / name
            out[name].write_bytes(self._call('GET', f'/jobs/{job_id}/files/{name}').content)
        return out


def run_on_server(client: ServerClient, model: str, inputs: Sequence[str], output: Path, request: dict,
                  progress, overwrite: bool = False, target_mask: Optional[str] = None,
                  forget: bool = False) -> List[str]:
    """A CLI run through the server: each case explained, its files written to `output` as a local run writes them
    (all or none). A case is uploaded only if the server holds none with its bytes, and stays there (under the
    server's bounds) for the next run, unless `forget`. Returns the cases written."""
    from .inputs import find_cases
    from .outputs import CaseOutputs, check_writable
    entry = next((m for m in client.models() if m['id'] == model), None)
    if entry is None:
        raise UsageError(f'the server has no model {model!r}; give -m as one of its ids: '
                         f'{", ".join(m["id"] for m in client.models())}')
    cases = find_cases(inputs, [entry['file_ending']], entry['channel_names'])
    if target_mask is not None and len(cases) > 1:
        raise UsageError('--target-mask applies to one case; pass a single case with it')
    check_writable(output)
    done, reused = [], 0
    for name, files in cases.items():
        progress.case = name
        if (output / f'{name}_cam.json').is_file() and not overwrite:
            progress.emit('skip', message=f'{name}: outputs exist in {output}, skipped (use --overwrite to redo)')
            continue
        progress.stage('upload', name)
        used = []
        try:
            case, held = client.case_for(files)
            used.append(case)
            reused += held
            region = request.get('region')
            if target_mask is not None:
                used.append(client.case_for([target_mask])[0])
                region = {'kind': 'mask', 'mask': used[-1]}
            job_request = {**request, 'name': name, **({'region': region} if region else {})}
            try:
                job_id = client.explain(model, case, **job_request)
            except CamError as e:
                if 'no case' not in str(e):
                    raise
                used[0] = case = client.upload(files)  # removed from the server since it was found
                job_id = client.explain(model, case, **job_request)
            progress.emit('log', message=f'{name}: {"already on the server" if held else "uploaded"}')
            job = client.wait(job_id, lambda e: _relay(progress, e))
            if job['status'] != 'done':
                raise CamError(job['error'] or f'the server {job["status"]} the job')
            with CaseOutputs(output) as co:
                client.download(job['id'], co.tmp, job['files'])
                for f in job['files']:
                    co.path(f)
                written = co.commit()
            client.cancel(job['id'])  # its files are here now
            progress.emit('result', files=sorted(written.values()),
                          message=f'{name}: wrote {len(written)} outputs to {output}')
        finally:
            for c in used if forget else ():
                client.delete_case(c)
        done.append(name)
    progress.emit('log', message=f'{reused} of {len(cases)} case(s) were already on the server')
    return done


def _relay(progress, event: dict) -> None:
    """A server job's event, given on as a local run gives it."""
    event = dict(event)
    kind = event.pop('event')
    event.pop('case', None)
    if kind == 'stage':
        progress.stage(event.pop('stage'), **event)
    elif kind in ('tiles', 'steps'):
        getattr(progress, kind)(event['tile' if kind == 'tiles' else 'step'], event[kind])
    elif kind != 'result':  # the server's paths; the files are written here and announced then
        progress.emit(kind, **event)
