"""The bearer token: its file (private, made with O_EXCL|O_NOFOLLOW) and its check, from the request's headers before
any body is read."""
import os
import secrets
import stat
import sys
from pathlib import Path

from fastapi.responses import JSONResponse

from ..errors import UsageError

MIN_TOKEN = 16    # characters: shorter is refused
GOOD_TOKEN = 32   # characters: shorter is warned about
NEW_TOKEN_BYTES = 32


def read_token(path: Path) -> str:
    """The token in `path`, refused unless the file is a regular file of this user that no one else can read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
    except OSError as e:
        raise UsageError(f'cannot read the token file {path} ({e.strerror}); give a regular file, not a link') from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if os.name != 'nt':
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise UsageError(f'the token file {path} is not a regular file of this user; make your own '
                                 f'(umask 077; python -c "import secrets; print(secrets.token_urlsafe(32))" > FILE)')
            if st.st_mode & 0o077:
                raise UsageError(f'the token file {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}); '
                                 f'chmod 600 {path} and make a new token, as others may have read it')
        token = f.read().strip()
    if len(token) < MIN_TOKEN:
        raise UsageError(f'the token in {path} is shorter than {MIN_TOKEN} characters; use a longer random one')
    if len(token) < GOOD_TOKEN:
        print(f'warning: the token in {path} has {len(token)} characters; a random one of {GOOD_TOKEN} or more is '
              f'safer (python -c "import secrets; print(secrets.token_urlsafe(32))")', file=sys.stderr)
    return token


def new_token(path: Path) -> str:
    """A new random token (32 bytes) in a new file readable by this user alone; an existing file or link is never
    written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(NEW_TOKEN_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0), 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(token + '\n')
    return token


def token_from(path: Path, explicit: bool) -> tuple:
    """(token, new): the token in `path`, or (where the server may make one) a new one written there."""
    if path.is_file() or path.is_symlink():
        return read_token(path), False
    if explicit:
        raise UsageError(f'no token file {path}; a server reachable from other hosts needs a token you made '
                         f'(e.g. umask 077; python -c "import secrets; print(secrets.token_urlsafe(32))" > {path})')
    return new_token(path), True


class TokenMiddleware:
    """401 unless the request's Authorization header carries the token: checked before the body is read (a route's
    dependencies run after FastAPI has received the body). Compared in constant time; never from the query."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f'Bearer {token}'.encode()

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http':
            given = dict(scope['headers']).get(b'authorization', b'')
            if not secrets.compare_digest(given, self.expected):
                response = JSONResponse({'detail': 'a valid bearer token is required'}, 401,
                                        {'WWW-Authenticate': 'Bearer', 'Connection': 'close'})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
