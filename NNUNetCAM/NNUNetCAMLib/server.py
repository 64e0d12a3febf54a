"""Runs on an explanation server (`nnunetv2_cam serve`): one started on this computer, in the chosen Python, on
first use and reused, or a remote one (URL + token). A ServerRun has CoreProcess's interface, so a CamRun reports
progress, cancels and loads the results the same way whichever runs the core."""
import json
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .environment import ensure_core_importable
from .process import CoreProcess


class ServerStartError(RuntimeError):
    """The local server did not start (its packages missing, a port or permission problem)."""


class ServerConnection:
    """A server and the cases sent to it, by the sha256 of their voxels and geometry (so a case is sent once)."""

    def __init__(self, url: str, token: str):
        ensure_core_importable()
        from nnunetv2_cam_core.client import ServerClient
        self.url, self.client = url, ServerClient(url, token)
        self.cases: Dict[str, str] = {}  # content key -> the server's case id
        self._listing: List[dict] = []

    def models(self) -> List[str]:
        """The ids of the models it serves (asked again here; model_info uses the last answer)."""
        self._listing = self.client.models()
        return [m['id'] for m in self._listing]

    def model_info(self, model: str) -> dict:
        """describe_model of the server's model `model` (its id there)."""
        listing = self._listing or self.client.models()
        for m in listing:
            if m['id'] == model:
                return m['info']
        raise ValueError(f'the server at {self.url} has no model {model!r}; it serves: '
                         f'{", ".join(m["id"] for m in listing) or "none"}')

    def status(self) -> str:
        h = self.client.health()
        loaded = ', '.join(f'{Path(m["model"]).name} folds {" ".join(map(str, m["folds"]))}'
                           for m in h['models_loaded']) or 'no model loaded'
        return f'{self.url} on {h["device"]}: {loaded}; {h["cases"]} case(s) uploaded'


def connect_server(url: str, token_file: str) -> ServerConnection:
    """A running server from its URL and the file holding its token. The token is read now and kept in memory
    only (not in the scene, not in the settings); the server is asked once, so a wrong URL or token fails here."""
    if not url.strip():
        raise ValueError('give the server\'s URL, e.g. http://gpu-server:8000 (nnunetv2_cam serve prints it)')
    try:
        token = Path(token_file).read_text().strip() if token_file else ''
    except OSError as e:
        raise ValueError(f'cannot read the token file {token_file} ({e.strerror or e}); give a copy of the file the '
                         f'server wrote (--token-file)') from None
    if not token:
        raise ValueError('give the file holding the server\'s token: a copy of the one it wrote (--token-file)')
    connection = ServerConnection(url.strip(), token)
    connection.client.timeout, timeout = 10, connection.client.timeout  # an unreachable host: 10 s, not 60
    connection.client.health()
    connection.client.timeout = timeout
    return connection


class LocalServer:
    """`nnunetv2_cam serve` on this computer, serving one model folder; started on first use, restarted for another
    folder, stopped by shutdown() (module cleanup). It also leaves by itself if Slicer dies (--parent-pid)."""
    LOG_LINES = 200  # its output after the start: the last lines are kept, the rest dropped

    def __init__(self, environment, temp_root: Optional[str] = None, start_timeout: float = 120):
        self.environment, self.temp_root, self.start_timeout = environment, temp_root, start_timeout
        self.device = 'auto'
        self.process: Optional[CoreProcess] = None
        self.started: Optional[tuple] = None  # (folder, device, python) it serves
        self.connection: Optional[ServerConnection] = None
        self.work: Optional[str] = None  # the server's own files: removed here too, should it be killed

    def connect(self, model_folder: str, device: str = 'auto', event_pump=None) -> ServerConnection:
        folder = str(Path(model_folder).resolve())
        started = (folder, device, self.environment.executable)
        if self.connection is not None and self.started == started and self.process.returncode is None:
            return self.connection
        self.device = device
        self.shutdown()
        token_dir = Path(tempfile.mkdtemp(prefix='nnunetcam-token-', dir=self.temp_root))  # private: nothing adopted
        token_file = token_dir / 'token'
        process = CoreProcess(self.environment.command('serve', '--models', folder, '--port', '0', '--token-file',
                                                       token_file, '-device', self.device, '--parent-pid',
                                                       os.getpid()), self.environment.env())
        listening, seen = _wait_for(process, lambda e: e.get('event') == 'listening', self.start_timeout, event_pump)
        if listening is None:
            process.cancel()
            shutil.rmtree(token_dir, ignore_errors=True)
            logs = [e['message'] for e in seen + process.poll() if e.get('event') == 'log'][-1:]
            raise ServerStartError(f'the local explanation server did not start: {logs[0] if logs else "no output"}')
        process.keep_last(self.LOG_LINES)  # nothing polls it from now on
        self.process, self.started, self.work = process, started, listening.get('work')
        self.connection = ServerConnection(listening['url'],
                                           listening.get('token') or token_file.read_text().strip())
        shutil.rmtree(token_dir, ignore_errors=True)  # the connection holds it; nothing stays on disk
        self.connection.models()  # asked once, now it answers: a run reads the model from this list, not the network
        return self.connection

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.cancel()
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.process = self.connection = self.started = self.work = None


def _wait_for(process: CoreProcess, match, timeout: float, event_pump) -> Tuple[Optional[dict], List[dict]]:
    """The first event that matches (None if the process ended or the time ran out), and the events before it."""
    import time
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline and process.returncode is None:
        for e in process.poll():
            if match(e):
                return e, seen
            seen.append(e)
        if event_pump:
            event_pump()
        time.sleep(0.05)
    return None, seen


class ServerRun:
    """One explanation on a server, with CoreProcess's interface (poll, returncode, cancel, command): sends the case
    unless the server holds it, runs the job, and writes its files into `out`, as a core run would.
    `content` (volumes.CaseContent) is hashed on this run's thread; the case is known by that key on this connection,
    and checked on the server (`has_case`) before it is used. Only a case the server does not hold is written
    (`write_case()`, called by poll() on the caller's thread, where MRML is touched) and then asked for by its files'
    hashes, and sent when the server has no such files either."""

    def __init__(self, connection: ServerConnection, content, write_case: Callable[[], List[str]],
                 mask: Optional[str], model: str, request: dict, out: Path):
        self.connection, self.content, self.out = connection, content, out
        self.command = ['server', connection.url, 'explain', model, json.dumps(request)]
        self._events: 'queue.Queue' = queue.Queue()
        self._job: Optional[str] = None
        self._cancel = threading.Event()
        self._rc: Optional[int] = None
        self.cancelled = False
        self.unreachable = False  # the server did not answer (died or hangs)
        self.held: Optional[bool] = None  # the server already held the case: nothing written or sent
        self.status: Optional[str] = None  # what the server holds after the job, asked on this run's thread
        self._write_case, self._files, self._files_error = write_case, None, None
        self._files_wanted, self._files_written = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(mask, model, request), daemon=True)
        self._thread.start()

    def _case_files(self) -> List[str]:
        """The case written to files by poll(), on the caller's thread."""
        self._files_wanted.set()
        while not self._files_written.wait(0.05):
            if self._cancel.is_set():
                raise RuntimeError('cancelled')
        if self._files_error is not None:
            raise self._files_error
        return self._files

    def _send_case(self, client, key: Optional[str]) -> str:
        case = self.connection.cases.get(key) if key else None
        if case is not None and client.has_case(case):  # it drops unused cases (--uploads-mb, --case-ttl-s)
            self.held = True
            return case
        self._events.put({'event': 'stage', 'stage': 'upload'})
        case, self.held = client.case_for(self._case_files())
        if key:
            self.connection.cases[key] = case
        return case

    def _run(self, mask, model, request) -> None:
        from nnunetv2_cam_core.errors import CamError
        client = self.connection.client
        try:
            key = self.content.key()
            case = self._send_case(client, key)
            if self.held:
                self._events.put({'event': 'stage', 'stage': 'held'})
            if mask is not None:
                request = {**request, 'region': {'kind': 'mask', 'mask': client.upload([mask])}}
            try:
                self._job = client.explain(model, case, **request)
            except CamError as e:
                if 'no case' not in str(e):
                    raise
                self.connection.cases.pop(key, None)  # dropped since it was asked for: sent again
                case = self._send_case(client, None)
                if key:
                    self.connection.cases[key] = case
                self._job = client.explain(model, case, **request)
            if self._cancel.is_set():
                client.cancel(self._job)
            job = client.wait(self._job, self._events.put)
            if job['status'] != 'done':
                raise RuntimeError(job['error'] or f'the server {job["status"]} the job')
            if self._cancel.is_set():
                raise RuntimeError('cancelled')
            self.out.mkdir(parents=True, exist_ok=True)
            client.download(self._job, self.out, job['files'])
            client.cancel(self._job)  # its files are here now
            if mask is not None:
                client.delete_case(request['region']['mask'])
            try:
                self.status = self.connection.status()
            except Exception:  # the results are here; the status line just stays
                pass
            self._rc = 0
        except Exception as e:
            self.unreachable = isinstance(e.__cause__ or e.__context__, OSError)  # requests' errors are OSErrors
            if not self._cancel.is_set():
                self._events.put({'event': 'error', 'message': str(e)})
            self._rc = 1

    def poll(self) -> List[dict]:
        if self._files_wanted.is_set() and not self._files_written.is_set():
            try:
                self._files = self._write_case()
            except Exception as e:  # reported by the run's thread
                self._files_error = e
            self._files_written.set()
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    @property
    def returncode(self) -> Optional[int]:
        return None if self._thread.is_alive() else self._rc

    def cancel(self, grace_s: float = 2.0) -> None:
        """The server stops the job within a tile; nothing is downloaded after this (the thread, should it still
        wait on the server, ends on its own)."""
        self.cancelled = True
        self._cancel.set()
        if self._job is not None:
            try:
                timeout, self.connection.client.timeout = self.connection.client.timeout, grace_s
                self.connection.client.cancel(self._job)
            except Exception:  # the server is gone or hangs: its job ends with it
                pass
            finally:
                self.connection.client.timeout = timeout
        self._thread.join(grace_s)
