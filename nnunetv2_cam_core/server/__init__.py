"""`nnunetv2_cam serve`: an HTTP server over CamEngine. Models and cases stay loaded; explanations run as jobs, one
at a time, with the same progress events as `--progress json`; a region is re-explained from the tiles that overlap
it alone, on the cached case and the cached stitched logits; at the last decoder stage another class or method
needs no forward pass (the layer's outputs are kept).

Safe by default: loopback only, a bearer token checked before any body is read, model folders only under `--models`
roots, opaque ids, uploads checked from their headers, and every resource bounded: upload size, voxels, tiles,
memory cache, upload space and lifetime, queue, event streams.

auth: the token; uploads: what a file may be; cache: what is kept; regions: boxes and balls; jobs: the Server and
its worker; routes: the API.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from ..errors import CamError, UsageError
from .auth import token_from
from .cache import Cache
from .jobs import API, ExplainRequest, Job, Limits, Server
from .regions import Region, region_array
from .routes import create_app

__all__ = ['API', 'Cache', 'ExplainRequest', 'Job', 'Limits', 'Region', 'Server', 'create_app', 'main',
           'region_array', 'sweep_stale']

KEEP_ALIVE_S = 10  # uvicorn's keep-alive: longer than Retry-After, so a retry on time finds its connection open


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


def sweep_stale(folder: Path) -> List[str]:
    """Remove the work folders (uploads, job files) that servers of this user left in `folder` when they were killed
    (kill -9, out of memory): nnunetcam-server-PID-* whose process is gone. Returns what was removed."""
    removed = []
    for d in folder.glob('nnunetcam-server-*'):
        m = re.fullmatch(r'nnunetcam-server-(\d+)-\w+', d.name)
        try:
            st = d.lstat()
        except OSError:
            continue
        if m and d.is_dir() and not d.is_symlink() and (os.name == 'nt' or st.st_uid == os.getuid()) \
                and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


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
    d = Limits()
    p = argparse.ArgumentParser(prog='nnunetv2_cam serve', description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', type=Path, required=True, help='the folders whose models may be used')
    p.add_argument('--host', default='127.0.0.1', help='default: loopback only')
    p.add_argument('--port', type=int, default=8765, help='0 picks a free port (printed)')
    p.add_argument('--token-file', type=Path, default=None,
                   help='bearer token file, 0600 and yours (default: a new random token in a new 0600 file under '
                        'the cache)')
    p.add_argument('-device', default='auto')
    p.add_argument('--max-upload-mb', type=float, default=d.max_upload_mb, help='one upload (default: %(default)s)')
    p.add_argument('--max-voxels', type=int, default=d.max_voxels,
                   help='voxels of one uploaded image, from its header (default: 512x512x2000 = %(default)s)')
    p.add_argument('--max-tiles', type=int, default=d.max_tiles,
                   help='tiles of one job (default: %(default)s)')
    p.add_argument('--cache-mb', type=float, default=d.cache_mb,
                   help='loaded models, preprocessed cases, logits and layer outputs kept in memory (LRU; default: '
                        '%(default)s)')
    p.add_argument('--uploads-mb', type=float, default=d.uploads_mb,
                   help='uploaded cases kept on disk (LRU; default: %(default)s)')
    p.add_argument('--case-ttl-s', type=float, default=d.case_ttl_s,
                   help='remove an uploaded case unused for this long (default: %(default)s)')
    p.add_argument('--queue', type=int, default=d.queue, help='jobs waiting at most; more get 503 (default: '
                                                              '%(default)s)')
    p.add_argument('--abandon-s', type=float, default=d.abandon_s,
                   help='cancel a running job whose client has not asked about it for this long (default: '
                        '%(default)s)')
    p.add_argument('--max-streams', type=int, default=d.max_streams,
                   help='open event streams at most; more get 503 (default: %(default)s)')
    p.add_argument('--stream-s', type=float, default=d.stream_s,
                   help='an event stream ends after this long; the client asks again from where it stopped '
                        '(default: %(default)s)')
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
        token, new = token_from(token_file, explicit=not loopback)
        swept = sweep_stale(Path(tempfile.gettempdir()))
        limits = Limits(**{k: getattr(args, k, v) for k, v in vars(d).items()})
        server = Server(args.models, args.device, limits)
    except CamError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
    if swept:
        print(f'removed {len(swept)} work folder(s) that killed servers left behind: {", ".join(swept)}',
              file=sys.stderr)
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
    config = uvicorn.Config(create_app(server, token), log_level='warning', ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, timeout_graceful_shutdown=2,
                            timeout_keep_alive=KEEP_ALIVE_S)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again under the handler it found: make that handler
    # an exit that runs the cleanup below, not the default one that ends the process on the spot
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.close()
    return 0
