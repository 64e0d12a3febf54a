"""The HTTP API (/v1) over a Server."""
import asyncio
import time
from typing import List, Optional

from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..client import ENDED
from .auth import TokenMiddleware
from .jobs import API, ExplainRequest, Job, Server
from .uploads import ENDINGS


def create_app(server: Server, token: str) -> FastAPI:
    def upload_size(request: Request) -> None:
        length = request.headers.get('content-length')
        if length is not None and length.isdigit() and int(length) > server.max_upload + (1 << 16):
            raise HTTPException(413, f'upload larger than --max-upload-mb {server.limits.max_upload_mb:g}')

    def stream_slot():
        """One of --max-streams open event streams, held until the stream ends."""
        with server.lock:
            if server.streams >= server.limits.max_streams:
                raise HTTPException(503, f'too many open event streams (--max-streams '
                                         f'{server.limits.max_streams}); retry later, or poll GET jobs/ID/events',
                                    headers={'Retry-After': str(server.limits.retry_after_s)})
            server.streams += 1
        try:
            yield
        finally:
            with server.lock:
                server.streams -= 1

    # no docs routes: FastAPI adds them without the app's dependencies; the token is checked (TokenMiddleware) before
    # a body is read, and bodies are bounded as they stream
    app = FastAPI(title='NNUNetCAM explanation server', docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=1 << 20)
    app.add_middleware(TokenMiddleware, token=token)

    @app.get(f'{API}/health')
    def health():
        return server.health()

    @app.get(f'{API}/models')
    def models():
        return server.list_models()

    @app.post(f'{API}/cases', dependencies=[Depends(upload_size)], max_body_size=server.max_upload + (1 << 16))
    def upload(files: List[UploadFile] = File(...)):
        """One file per channel; returns the case (its id from its contents: the same bytes, the same case)."""
        return server.add_case(files)

    @app.get(f'{API}/cases')
    def find_case(ending: str = Query(..., max_length=16), sha256: List[str] = Query(..., max_length=64)):
        """The case holding files with these contents (sha256 of each channel's bytes, in channel order), or 404."""
        if ending not in ENDINGS:
            raise HTTPException(422, f'ending is one of {", ".join(ENDINGS)}')
        return server.find_case(ending, sha256)

    @app.get(f'{API}/cases/{{case_id}}')
    def case(case_id: str):
        return server.case(case_id).public()

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

    @app.get(f'{API}/jobs/{{job_id}}/stream', response_class=EventSourceResponse,
             dependencies=[Depends(stream_slot)])
    async def stream(job: Job = Depends(server.job), since: int = Query(0, ge=0),
                     last_event_id: Optional[int] = Header(None, ge=0)):
        """The job's events from `since` (or after a reconnecting browser's Last-Event-ID) on as server-sent events
        (`id`: the event's index), until it ends or --stream-s pass (then the client asks again from where it
        stopped, so a stalled stream does not hold its place)."""
        if last_event_id is not None:
            since = max(since, last_event_id + 1)
        until = time.monotonic() + server.limits.stream_s
        while time.monotonic() < until:
            job.seen = time.monotonic()  # a client listens: not abandoned
            ended = job.status in ENDED
            for event in job.events[since:]:
                yield ServerSentEvent(data=event, id=str(since))
                since += 1
            if ended:
                return
            await asyncio.sleep(0.1)

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
