"""The explanation server against a hostile or careless client, as a real process on 127.0.0.1 over real HTTP. No
model is needed: the server serves an empty --models folder; uploads, the token and the bounds are checked before
any model is."""
import gzip
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import nibabel
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import start_server

ADDRESS_SPACE = 6 << 30  # the server runs under this: a crafted upload cannot take the machine's memory


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


@pytest.fixture(scope='module')
def bare(tmp_path_factory):
    """A server with no model, small bounds, under an address-space limit; started after two work folders were
    left in its temp folder: a killed server's and a running one's."""
    tmp = tmp_path_factory.mktemp('bare')
    (tmp / 'models').mkdir()
    stale = {'dead': tmp / 'tmp' / f'nnunetcam-server-{_dead_pid()}-abc123',
             'alive': tmp / 'tmp' / f'nnunetcam-server-{os.getpid()}-def456'}
    for folder in stale.values():
        (folder / 'cases' / '0123456789abcdef').mkdir(parents=True)
        (folder / 'cases' / '0123456789abcdef' / 'patient_0000.nii.gz').write_bytes(b'voxels')
    proc, first = start_server(tmp / 'models', tmp, '--max-upload-mb', '8', '--uploads-mb', '1', '--case-ttl-s', '6',
                               '--max-streams', '0', preexec_fn=_limit_memory)
    try:
        assert first['event'] == 'listening'
        yield {'url': first['url'], 'auth': {'Authorization': f'Bearer {first["token"]}'}, 'proc': proc,
               'stale': stale, 'tmp': tmp}
    finally:
        proc.terminate()
        proc.wait(10)


def image(path, shape=(8, 9, 10), dtype=np.float32, seed=0):
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(seed).random(shape).astype(dtype)), str(path))
    return path


def post(bare, name, content):
    return requests.post(f'{bare["url"]}/v1/cases', files={'files': (name, content)}, headers=bare['auth'],
                         timeout=30)


def health(bare) -> dict:
    r = requests.get(f'{bare["url"]}/v1/health', headers=bare['auth'], timeout=10)
    assert r.ok
    return r.json()


def one_line(r) -> str:
    detail = r.json()['detail']
    assert isinstance(detail, str) and '\n' not in detail, detail
    return detail


def test_a_header_naming_another_file_is_refused_for_cases_and_masks(bare, tmp_path):
    """A MetaImage or NRRD header whose voxels are another file on the server (any file it can read, /dev/zero, a
    FIFO), a NIfTI whose voxels are in an .img, another format under an allowed ending: 415 from the header, with
    nothing kept; the images those formats hold inline are accepted."""
    raw = image(tmp_path / 'real.nii').read_bytes()[352:]  # a real image's voxels, as a file on the server
    secret = tmp_path / 'secret.raw'
    secret.write_bytes(raw)
    mha = (f'ObjectType = Image\nNDims = 3\nDimSize = 10 9 8\nElementType = MET_FLOAT\nElementDataFile = {secret}\n'
           ).encode()
    nrrd = (f'NRRD0004\ntype: float\ndimension: 3\nsizes: 10 9 8\nencoding: raw\nendian: little\n'
            f'data file: {secret}\n\n').encode()
    pair = bytearray(nibabel.Nifti1Header().binaryblock)
    pair[344:348] = b'ni1\0'  # a .hdr whose voxels are in an .img
    crafted = {'case_0000.mha': mha, 'mask.mha': mha, 'case_0000.nrrd': nrrd, 'mask.nrrd': nrrd,
               'zero_0000.mha': mha.replace(str(secret).encode(), b'/dev/zero'),
               'datafile_0000.nrrd': nrrd.replace(b'data file:', b'datafile:'),
               'list_0000.mha': mha.replace(str(secret).encode(), b'LIST'),
               'pair_0000.nii': bytes(pair) + b'\0' * 4, 'meta_0000.nii.gz': gzip.compress(mha)}
    before = health(bare)
    for name, content in crafted.items():
        r = post(bare, name, content)
        assert r.status_code == 415, (name, r.status_code, r.text)
        assert name in one_line(r)
    after = health(bare)
    assert (after['cases'], after['uploads_bytes']) == (before['cases'], before['uploads_bytes'])
    for ending in ('.nii.gz', '.nii', '.mha', '.nrrd'):
        path = image(tmp_path / f'ok_0000{ending}')
        assert post(bare, path.name, path.read_bytes()).status_code == 200, ending


def _bomb(shape) -> bytes:
    """A gzipped NIfTI header claiming `shape` float32 voxels, and no voxels: tens of bytes."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    return gzip.compress(header.binaryblock + b'\0' * 4, 9)


def _peak_rss_mb(pid: int) -> float:
    with open(f'/proc/{pid}/status') as f:
        return int(next(line for line in f if line.startswith('VmHWM')).split()[1]) / 1024


def test_a_69_byte_upload_claiming_billions_of_voxels_is_refused_from_its_header(bare):
    """Above --max-voxels, or more voxels than deflate can make of its bytes: 413 from the header, one line; the
    server (under an address-space limit, so the machine is safe either way) allocates nothing and goes on."""
    peak = _peak_rss_mb(bare['proc'].pid)
    huge, big = _bomb((1500, 1500, 1000)), _bomb((600, 600, 400))
    assert len(huge) < 100 and len(big) < 100
    r = post(bare, 'bomb_0000.nii.gz', huge)
    assert r.status_code == 413 and '--max-voxels' in one_line(r)
    r = post(bare, 'bomb_0000.nii.gz', big)
    assert r.status_code == 413 and 'bytes of voxels in' in one_line(r)
    assert health(bare)['cases'] >= 0 and bare['proc'].poll() is None
    assert _peak_rss_mb(bare['proc'].pid) - peak < 100


def test_a_request_without_the_token_is_refused_before_its_body_is_sent(bare):
    """The client sends the headers of an upload and no body: 401 at once (the token is read from the headers;
    above the JSON routes' 1 MiB, 413 from Content-Length), where the body used to be awaited first."""
    port = int(bare['url'].rsplit(':', 1)[1])
    for length, statuses in ((1000, {b'401'}), (4 << 20, {b'401', b'413'})):
        with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
            t = time.perf_counter()
            s.sendall(b'POST /v1/cases HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n'
                      b'Content-Length: %d\r\n\r\n' % length)
            status = s.recv(64).split(b' ')[1]
            waited = time.perf_counter() - t
        assert status in statuses and waited < 30, (length, status, waited)


def test_a_step_size_outside_its_bounds_and_bad_names_get_422_not_500(bare, tmp_path):
    path = image(tmp_path / 'case_0000.nii.gz')
    case = post(bare, path.name, path.read_bytes()).json()['id']
    explain = f'{bare["url"]}/v1/explain'
    for step in (0.05, 1e-4, 0, 1.5):
        r = requests.post(explain, json={'model': 'm', 'case': case, 'step_size': step}, headers=bare['auth'],
                          timeout=10)
        assert r.status_code == 422 and r.json()['detail'][0]['loc'] == ['body', 'step_size'], step
    r = requests.post(explain, json={'model': 'Dataset\x00x', 'case': case}, headers=bare['auth'], timeout=10)
    assert r.status_code == 422 and r.json()['detail'][0]['loc'] == ['body', 'model']
    r = post(bare, 'a' * 300 + '_0000.nii.gz', path.read_bytes())
    assert r.status_code == 422 and 'at most' in one_line(r)
    assert health(bare)['cases'] >= 1  # and it goes on


def read_response(s: socket.socket) -> tuple:
    """One whole HTTP/1.1 response from a kept-alive socket: (head, body), the body by its Content-Length."""
    def more() -> bytes:
        chunk = s.recv(4096)
        assert chunk, 'the server closed the connection'
        return chunk
    data = b''
    while b'\r\n\r\n' not in data:
        data += more()
    head, body = data.split(b'\r\n\r\n', 1)
    length = int(next(line.split(b':')[1] for line in head.split(b'\r\n') if line.lower().startswith(b'content-length')))
    while len(body) < length:
        body += more()
    return head.decode(), body


def test_a_retry_after_retry_after_finds_its_kept_alive_connection_open(bare):
    """A 503 (here: no event stream may open) says when to retry; the connection it came on is still open then."""
    port = int(bare['url'].rsplit(':', 1)[1])
    token = bare['auth']['Authorization']
    with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
        s.sendall(f'GET /v1/jobs/{"0" * 16}/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n'.encode())
        head, _ = read_response(s)
        assert head.startswith('HTTP/1.1 503')
        retry_after = int(next(line.split(':')[1] for line in head.split('\r\n')
                               if line.lower().startswith('retry-after')))
        time.sleep(retry_after + 0.5)
        s.sendall(f'GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n'.encode())
        assert read_response(s)[0].startswith('HTTP/1.1 200')


def test_uploads_are_bounded_in_space_and_lifetime(bare, tmp_path):
    """--uploads-mb 1: a fourth 0.4 MB case evicts the least recently used; --case-ttl-s 6: a case unused for
    longer is removed, files and all."""
    url, auth = bare['url'], bare['auth']
    ids = []
    for k in range(3):
        path = image(tmp_path / f'c{k}_0000.nii', shape=(10, 100, 100), seed=k + 1)
        ids.append(post(bare, path.name, path.read_bytes()).json()['id'])
    h = health(bare)
    assert h['uploads_bytes'] <= h['uploads_limit_bytes'] == 1 << 20
    present = [requests.get(f'{url}/v1/cases/{c}', headers=auth, timeout=10).status_code for c in ids]
    assert present == [404, 200, 200]
    work = next((bare['tmp'] / 'tmp').glob(f'nnunetcam-server-{bare["proc"].pid}-*'))
    assert sorted(p.name for p in (work / 'cases').iterdir()) == sorted(ids[1:])
    time.sleep(7)
    assert health(bare)['cases'] == 0 and not any((work / 'cases').iterdir())


def test_identical_bytes_are_one_case_even_uploaded_at_once(bare, tmp_path):
    path = image(tmp_path / 'same_0000.nii.gz', seed=5)
    answers = [None] * 4

    def upload(i):
        answers[i] = post(bare, path.name, path.read_bytes()).json()

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len({a['id'] for a in answers}) == 1 and sum(a['new'] for a in answers) == 1
    import hashlib
    r = requests.get(f'{bare["url"]}/v1/cases', params={'ending': '.nii.gz', 'sha256': hashlib.sha256(
        path.read_bytes()).hexdigest()}, headers=bare['auth'], timeout=10)
    assert r.json()['id'] == answers[0]['id']
    (tmp_path / 'other').mkdir()
    other = image(tmp_path / 'other' / 'same_0000.nii.gz', seed=6)
    assert post(bare, other.name, other.read_bytes()).json()['id'] != answers[0]['id']  # same name, other bytes


def test_a_killed_servers_work_folder_is_removed_on_start_and_a_running_ones_kept(bare):
    assert not bare['stale']['dead'].exists()
    assert (bare['stale']['alive'] / 'cases' / '0123456789abcdef' / 'patient_0000.nii.gz').is_file()


def test_a_token_file_others_can_read_is_refused(tmp_path):
    token = tmp_path / 'token'
    token.write_text('a' * 40)
    token.chmod(0o644)
    (tmp_path / 'models').mkdir()
    p = subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', 'serve', '--models', str(tmp_path / 'models'),
                        '--host', '127.0.0.2', '--port', '0', '--token-file', str(token)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ''
    assert p.stderr.count('\n') == 1 and 'chmod 600' in p.stderr


def test_token_files_are_made_private_and_never_through_a_link(tmp_path, capsys):
    from nnunetv2_cam_core.errors import UsageError
    from nnunetv2_cam_core.server.auth import new_token, read_token
    path = tmp_path / 'new'
    token = new_token(path)
    assert oct(path.stat().st_mode & 0o777) == '0o600' and len(token) >= 43  # 32 random bytes
    assert read_token(path) == token
    with pytest.raises(FileExistsError):
        new_token(path)
    link = tmp_path / 'link'
    link.symlink_to(path)
    with pytest.raises(FileExistsError):
        new_token(link)
    with pytest.raises(UsageError, match='not a link'):
        read_token(link)
    short = tmp_path / 'short'
    short.write_text('b' * 20)
    short.chmod(0o600)
    assert read_token(short) == 'b' * 20 and 'has 20 characters' in capsys.readouterr().err


@pytest.mark.parametrize('ending', ['.nii.gz', '.nii', '.mha', '.nrrd'])
def test_nan_and_inf_are_refused_in_every_format(ending, tmp_path):
    """SimpleITK reads NaN and Inf in a NIfTI as 0 (so nnU-Net's SimpleITKIO does) and keeps them in .mha/.nrrd:
    the core refuses them in each, with the same line."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2_cam_core.errors import UsageError
    from nnunetv2_cam_core.inputs import read_case
    a = np.ones((6, 7, 8), np.float32)
    a[1, 2, 3], a[2, 2, 2] = np.nan, np.inf
    path = tmp_path / f'nan_0000{ending}'
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    with pytest.raises(UsageError, match='has 2 NaN/inf voxels'):
        read_case(SimpleITKIO(), [str(path)], 1, True)
