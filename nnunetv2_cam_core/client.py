"""A small client of `nnunetv2_cam serve`."""
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import requests

from .errors import CamError


class ServerClient:
    def __init__(self, url: str, token: str, timeout: float = 60):
        self.url, self.timeout = url.rstrip('/') + '/v1', timeout
        self.session = requests.Session()
        self.session.headers['Authorization'] = f'Bearer {token}'

    def _call(self, method: str, path: str, **kwargs):
        r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        if r.status_code >= 400:
            detail = r.json().get('detail') if r.headers.get('content-type', '').startswith('application/json') \
                else r.text
            raise CamError(f'server: {r.status_code} {detail}')
        return r

    def health(self) -> dict:
        return self._call('GET', '/health').json()

    def models(self) -> List[dict]:
        return self._call('GET', '/models').json()

    def upload(self, files: Sequence[str]) -> str:
        """One file per channel, in channel order; returns the case id."""
        handles = [open(f, 'rb') for f in files]
        try:
            return self._call('POST', '/cases', files=[('files', (Path(f).name, h)) for f, h in
                                                       zip(files, handles)]).json()['id']
        finally:
            for h in handles:
                h.close()

    def delete_case(self, case_id: str) -> None:
        self._call('DELETE', f'/cases/{case_id}')

    def explain(self, model: str, case: str, **request) -> str:
        """Returns the job id; `request` holds ExplainRequest's other fields."""
        return self._call('POST', '/explain', json={'model': model, 'case': case, **request}).json()['id']

    def wait(self, job_id: str, on_event: Optional[Callable[[dict], None]] = None, poll_s: float = 0.2) -> dict:
        """Until the job ends, passing each progress event on; returns the job (status, error, files)."""
        seen = 0
        while True:
            job = self._call('GET', f'/jobs/{job_id}').json()
            for event in self._call('GET', f'/jobs/{job_id}/events', params={'since': seen}).json():
                seen += 1
                if on_event:
                    on_event(event)
            if job['status'] in ('done', 'failed', 'cancelled'):
                return job
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> None:
        self._call('DELETE', f'/jobs/{job_id}')

    def download(self, job_id: str, folder: Path, names: Sequence[str]) -> Dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for name in names:
            out[name] = folder / name
            out[name].write_bytes(self._call('GET', f'/jobs/{job_id}/files/{name}').content)
        return out
