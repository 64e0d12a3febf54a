"""The explanation server, run as a real process on 127.0.0.1 and used over real HTTP."""
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import run_cli, start_server
from nnunetv2_cam_core.client import ServerClient
from nnunetv2_cam_core.errors import CamError
from nnunetv2_cam_core.demo import SPACING, write_sample_case


@pytest.fixture(scope='module')
def server(results_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('server')
    proc, first = start_server(results_dir, tmp, '--max-upload-mb', '8', '--queue', '2', '--max-tiles', '200')
    try:
        assert first['event'] == 'listening' and first['url'].startswith('http://127.0.0.1:')
        yield first['url'], first['token'], tmp / 'token', results_dir
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope='module')
def client(server):
    url, token, _, _ = server
    return ServerClient(url, token)


def model_id(model3d, results_dir) -> str:
    return str(model3d.relative_to(results_dir))


def run(client, model, case, **request) -> dict:
    job = client.wait(client.explain(model, case, **request))
    assert job['status'] == 'done', job
    return job


def sidecar(client, job) -> dict:
    name = next(f for f in job['files'] if f.endswith('_cam.json'))
    return json.loads(client._call('GET', f'/jobs/{job["id"]}/files/{name}').content)


def test_token_is_random_private_and_required(server):
    url, token, token_file, _ = server
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert token_file.read_text().strip() == token and len(token) >= 32
    assert requests.get(f'{url}/v1/health', timeout=10).status_code == 401
    wrong = requests.get(f'{url}/v1/health', headers={'Authorization': 'Bearer ' + 'x' * len(token)}, timeout=10)
    assert wrong.status_code == 401
    assert requests.get(f'{url}/v1/health', headers={'Authorization': f'Bearer {token}'}, timeout=10).ok


def test_refuses_what_is_not_allowed_and_keeps_serving(server, client, small_case, model3d, tmp_path):
    url, token, _, results_dir = server
    auth = {'Authorization': f'Bearer {token}'}
    case = client.upload([str(small_case)])
    for outside in ('../../..', '/etc', str(results_dir.parent)):
        r = requests.post(f'{url}/v1/explain', json={'model': outside, 'case': case}, headers=auth, timeout=10)
        assert r.status_code == 403, outside
    big = tmp_path / 'big_0000.nii.gz'
    big.write_bytes(os.urandom(9 * 1024 ** 2))
    with open(big, 'rb') as f:
        assert requests.post(f'{url}/v1/cases', files={'files': (big.name, f)}, headers=auth,
                             timeout=30).status_code == 413
    r = requests.post(f'{url}/v1/explain', data='{"model": 1', headers={**auth, 'Content-Type': 'application/json'},
                      timeout=10)
    assert r.status_code == 422
    r = requests.post(f'{url}/v1/explain', json={'model': model_id(model3d, results_dir)}, headers=auth, timeout=10)
    assert r.status_code == 422 and r.json()['detail'][0]['loc'] == ['body', 'case']
    for path in ('/v1/jobs/..%2F..%2Fetc%2Fpasswd', f'/v1/jobs/{"0" * 16}/files/..%2F..%2Ftoken',
                 '/v1/cases/../../etc'):
        assert requests.get(url + path, headers=auth, timeout=10).status_code in (404, 405), path
    r = requests.delete(f'{url}/v1/cases/..%2F{case}', headers=auth, timeout=10)
    assert r.status_code == 404
    for path in ('/docs', '/redoc', '/openapi.json'):  # no route that skips the token
        assert requests.get(url + path, headers=auth, timeout=10).status_code == 404, path
    # a checkpoint is a file name in fold_N/, never a path (nnU-Net unpickles it)
    r = requests.post(f'{url}/v1/explain', json={'model': model_id(model3d, results_dir), 'case': case,
                                                 'checkpoint': '../../../../tmp/x.pth'}, headers=auth, timeout=10)
    assert r.status_code == 422 and r.json()['detail'][0]['loc'] == ['body', 'checkpoint']
    # an unauthenticated body is bounded before it is read
    r = requests.post(f'{url}/v1/explain', data=b'{' + b' ' * (2 << 20), timeout=30,
                      headers={'Content-Type': 'application/json'})
    assert r.status_code in (401, 413)
    # a failing job reports the CLI's one line; the next one runs
    job = client.wait(client.explain(model_id(model3d, results_dir), case, classes=['tumour'], tta=False))
    assert job['status'] == 'failed' and 'tumour' in job['error'] and '\n' not in job['error']
    run(client, model_id(model3d, results_dir), case, classes=['lesion'], tta=False)


def test_second_request_on_a_cached_case_loads_and_preprocesses_nothing(server, client, model3d, tmp_path):
    model = model_id(model3d, server[3])
    # bytes no earlier test uploaded (the server keeps cases by content)
    small_case = write_sample_case(tmp_path / 'in', seed=8, shape=(16, 32, 32), spacing=(1.0, 1.0, 1.8), name='small')
    case = client.upload([str(small_case)])
    before = client.health()['counters']
    first = run(client, model, case, classes=['lesion'], folds=[0], tta=False)
    second = run(client, model, case, classes=['organ'], folds=[0], tta=False, method='hirescam')
    after = client.health()['counters']
    assert after['preprocessings'] - before['preprocessings'] == 1
    assert after['model_loads'] - before['model_loads'] <= 1  # 0 if an earlier test loaded it
    assert {'model', 'preprocessed case'} <= set(second['reused'])
    s1, s2 = sidecar(client, first), sidecar(client, second)
    assert list(s1['classes']) == ['lesion'] and list(s2['classes']) == ['organ'] and s2['method'] == 'hirescam'
    # at the default layer (the last decoder stage) no tile ran a forward: its kept layer outputs stood in
    assert s2['forwards_from_layer_cache'] == s2['tiles'] > 0
    assert after['forwards_from_layer_cache'] - before['forwards_from_layer_cache'] == s2['tiles']
    # the results, in the uploaded image's geometry, equal a CLI run's
    files = client.download(second['id'], tmp_path / 'served', second['files'])
    assert run_cli(['-i', small_case, '-o', tmp_path / 'cli', '-m', model3d, '-f', '0', '--disable_tta',
                    '--target-class', 'organ', '--method', 'hirescam', '-device', 'cpu']) == 0
    assert sorted(second['files']) == sorted(p.name for p in (tmp_path / 'cli').iterdir())  # named as the CLI's
    for name in ('small.nii.gz', 'small_cam_organ_hirescam.nii.gz'):
        theirs = sitk.ReadImage(str(tmp_path / 'cli' / name))
        ours = sitk.ReadImage(str(files[name]))
        assert ours.GetSize() == theirs.GetSize() and ours.GetDirection() == theirs.GetDirection()
        assert np.allclose(ours.GetOrigin(), theirs.GetOrigin()) and np.allclose(ours.GetSpacing(),
                                                                                  theirs.GetSpacing())
        assert np.allclose(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs), atol=1e-5)


@pytest.fixture(scope='module')
def large_case(tmp_path_factory):
    return write_sample_case(tmp_path_factory.mktemp('large'), seed=11, shape=(40, 144, 144), spacing=SPACING,
                             objects=12, name='large')


def test_a_region_runs_its_tiles_alone_and_equals_a_full_run_with_that_mask(server, client, large_case, model3d,
                                                                            tmp_path):
    """A box around one object, in voxel indices and as RAS millimetres: only the tiles that overlap it run, and
    the map equals the CLI's full run with the same target mask, inside and outside the box."""
    model = model_id(model3d, server[3])
    case = client.upload([str(large_case)])
    common = dict(classes=['lesion'], folds=[0], tta=False)
    full = run(client, model, case, **common)
    n_full = sidecar(client, full)['tiles']
    img = sitk.ReadImage(str(large_case))
    lo, hi = [60, 60, 14], [80, 80, 24]
    box = run(client, model, case, region={'kind': 'box', 'box': [lo, hi]}, **common)
    s = sidecar(client, box)
    assert s['target_region'] == 'mask' and s['tiles'] < n_full
    assert any('stitched logits' in r for r in box['reused'])
    ras = [[-c[0], -c[1], c[2]] for c in (img.TransformIndexToPhysicalPoint(lo), img.TransformIndexToPhysicalPoint(hi))]
    by_mm = run(client, model, case, region={'kind': 'box', 'box': ras, 'space': 'ras'}, **common)
    files = client.download(box['id'], tmp_path / 'box', box['files'])
    mm = client.download(by_mm['id'], tmp_path / 'mm', ['large_cam_lesion_gradcam.nii.gz'])
    mask = np.zeros(sitk.GetArrayViewFromImage(img).shape, np.uint8)
    mask[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = 1
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(img)
    sitk.WriteImage(m, str(tmp_path / 'box.nii.gz'))
    assert run_cli(['-i', large_case, '-o', tmp_path / 'cli', '-m', model3d, '-f', '0', '--disable_tta',
                    '--target-class', 'lesion', '--target-mask', tmp_path / 'box.nii.gz', '-device', 'cpu']) == 0
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'cli' / 'large_cam_lesion_gradcam.nii.gz')))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(files['large_cam_lesion_gradcam.nii.gz'])))
    assert theirs.max() > 0 and np.allclose(ours, theirs, atol=1e-4)
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(mm['large_cam_lesion_gradcam.nii.gz']))), ours,
                       atol=1e-6)
    # another class on the cached case: each class's target from the cached stitched segmentation, so tiles without
    # any of it do not run (equality with a full run under the same masks: test_stitching)
    organ = run(client, model, case, classes=['organ', 'lesion'], folds=[0], tta=False)
    s = sidecar(client, organ)
    assert s['server']['target_mask'] == 'stitched segmentation' and s['tiles'] <= n_full
    assert all(s['classes'][c]['max'] == 1 for c in ('organ', 'lesion'))
    # one click: a ball of 5 mm around a point
    point = run(client, model, case, region={'kind': 'point', 'point': [70, 70, 19], 'radius_mm': 5}, **common)
    s = sidecar(client, point)
    assert s['tiles'] < n_full and s['server']['region']['kind'] == 'point'
    seg_full = client.download(full['id'], tmp_path / 'full', ['large.nii.gz'])['large.nii.gz']
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(files['large.nii.gz']))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(seg_full))))


def test_job_events_stream_as_server_sent_events_while_the_job_runs(server, client, model3d, tmp_path):
    """A job's events arrive as server-sent events while it runs (the first before it ends), each with its index
    as id, the same as the polled list; `since` takes a stream up where it stopped; the token and the job id are
    checked before a stream opens."""
    url, token, _, results_dir = server
    auth = {'Authorization': f'Bearer {token}'}
    fresh = write_sample_case(tmp_path, seed=9, shape=(16, 32, 32), spacing=(1.0, 1.0, 1.8), name='small')
    job_id = client.explain(model_id(model3d, results_dir), client.upload([str(fresh)]), classes=['lesion'],
                            tta=False, folds=[0])
    events, ids, status_at_first = [], [], None
    with requests.get(f'{url}/v1/jobs/{job_id}/stream', headers=auth, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith('id:'):
                ids.append(int(line[3:]))
            if line.startswith('data:'):
                events.append(json.loads(line[5:]))
                status_at_first = status_at_first or client._call('GET', f'/jobs/{job_id}').json()['status']
    job = client._call('GET', f'/jobs/{job_id}').json()
    assert job['status'] == 'done' and status_at_first in ('queued', 'running')
    assert ids == list(range(len(events)))
    assert events == client._call('GET', f'/jobs/{job_id}/events').json() and len(events) == job['events'] > 2
    assert {'stage', 'tiles'} <= {e['event'] for e in events}
    for params, extra in (({'since': 2}, {}), ({}, {'Last-Event-ID': '1'})):  # `since`, or a browser's reconnect
        with requests.get(f'{url}/v1/jobs/{job_id}/stream', params=params, headers={**auth, **extra}, stream=True,
                          timeout=60) as r:
            rest = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith('data:')]
        assert rest == events[2:]
    assert requests.get(f'{url}/v1/jobs/{job_id}/stream', params={'since': -1}, headers=auth,
                        timeout=10).status_code == 422
    assert requests.get(f'{url}/v1/jobs/{job_id}/stream', timeout=10).status_code == 401
    assert requests.get(f'{url}/v1/jobs/{"0" * len(job_id)}/stream', headers=auth, timeout=10).status_code == 404
    seen = []
    assert client.wait(job_id, seen.append)['status'] == 'done' and seen == events


def test_cancel_stops_the_job_and_the_next_one_runs(server, client, small_case, model3d, tmp_path):
    model = model_id(model3d, server[3])
    large_case = write_sample_case(tmp_path, seed=12, shape=(40, 144, 144), spacing=SPACING, objects=12, name='large')
    case = client.upload([str(large_case)])
    job_id = client.explain(model, case, classes=['lesion'], folds=[0], tta=False)  # 75 tiles, 0.2 s each
    while not any(e['event'] == 'tiles' for e in client._call('GET', f'/jobs/{job_id}/events').json()):
        time.sleep(0.1)
    t = time.perf_counter()
    client.cancel(job_id)
    job = client.wait(job_id)
    assert job['status'] == 'cancelled' and time.perf_counter() - t < 2 and not job['files']
    run(client, model, client.upload([str(small_case)]), classes=['lesion'], tta=False)


def test_concurrent_requests_are_retried_while_the_queue_is_full_and_none_is_mixed_up(server, small_case, model3d,
                                                                                     tmp_path):
    """20 clients at once against a queue of 2: a client told the server is busy (503, Retry-After) asks again on
    time, on its kept-alive connection; every request completes with its own class, and the maps of one class are
    bit-identical."""
    url, token, _, results_dir = server
    model = model_id(model3d, results_dir)
    client = ServerClient(url, token)
    case = client.upload([str(small_case)])
    jobs = [None] * 20

    def ask(i):
        patient = ServerClient(url, token, busy_retries=40)
        jobs[i] = patient.wait(patient.explain(model, case, classes=[['lesion', 'organ'][i % 2]], tta=False,
                                               folds=[0]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    assert all(job is not None and job['status'] == 'done' for job in jobs)
    maps = {}
    for i, job in enumerate(jobs):
        name = ['lesion', 'organ'][i % 2]
        assert list(sidecar(client, job)['classes']) == [name]
        f = client.download(job['id'], tmp_path / job['id'], [f'small_cam_{name}_gradcam.nii.gz'])
        maps.setdefault(name, []).append(sitk.GetArrayFromImage(sitk.ReadImage(str(next(iter(f.values()))))))
    assert all(np.array_equal(m, ms[0]) for ms in maps.values() for m in ms)
    h = client.health()
    assert h['cache_bytes'] <= h['cache_limit_bytes'] and h['queued'] == 0


def test_cli_runs_on_the_server_and_writes_what_a_local_run_writes(server, small_case, model3d, tmp_path, capsys):
    url, _, token_file, results_dir = server
    common = ['-i', small_case, '-f', '0', '--disable_tta', '--target-class', 'lesion', 'organ', '--progress', 'json']
    assert run_cli(['-o', tmp_path / 'local', '-m', model3d, '-device', 'cpu', *common]) == 0
    assert run_cli(['-o', tmp_path / 'served', '-m', model_id(model3d, results_dir), '--server', url,
                    '--token-file', token_file, *common]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = [e for e in events if e['event'] == 'result'][-1]  # the local files, not the server's
    assert result['files'] == sorted(str(tmp_path / 'served' / n) for n in os.listdir(tmp_path / 'served'))
    assert {'upload', 'tiles', 'done'} <= {e.get('stage') for e in events}
    local, served = sorted(tmp_path.joinpath('local').iterdir()), sorted(tmp_path.joinpath('served').iterdir())
    assert [p.name for p in local] == [p.name for p in served]
    for a, b in zip(local, served):
        if a.suffix == '.gz':
            assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(a))),
                               sitk.GetArrayFromImage(sitk.ReadImage(str(b))), atol=1e-5), a.name
    assert json.loads((tmp_path / 'served' / 'small_cam.json').read_text())['server']['region'] == {'kind': 'predicted', 'mask': None, 'box': None,
                                                                      'point': None, 'radius_mm': 10.0,
                                                                      'space': 'voxel'}


def test_cli_on_a_server_refuses_what_runs_locally_only(server, small_case, capsys, tmp_path):
    url, _, token_file, _ = server
    base = ['-i', small_case, '-o', tmp_path, '-m', 'x', '--server', url]
    assert run_cli([*base, '--token-file', tmp_path / 'none']) == 2
    assert run_cli([*base, '--token-file', token_file, '--evaluate', '--save-raw']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 'needs --token-file' in err[0] and '--evaluate, --save-raw run locally only' in err[1]
    assert run_cli([*base, '--token-file', token_file]) == 2
    assert 'the server has no model' in capsys.readouterr().err


def start(results_dir, tmp_path, *extra):
    proc, first = start_server(results_dir, tmp_path, *extra)
    return proc, ServerClient(first['url'], first['token'])


def test_a_job_whose_client_went_away_is_abandoned(results_dir, large_case, model3d, tmp_path):
    proc, client = start(results_dir, tmp_path, '--abandon-s', '2')
    try:
        job_id = client.explain(model_id(model3d, results_dir), client.upload([str(large_case)]),
                                classes=['lesion'], folds=[0], tta=False)  # 75 tiles: longer than 2 s
        with client.session.get(f'{client.url}/jobs/{job_id}/stream', stream=True, timeout=30) as r:
            t = time.monotonic()
            for _ in r.iter_lines():  # a client listening to the stream keeps the job alive past --abandon-s
                if time.monotonic() - t > 4:
                    break
        assert client._call('GET', f'/jobs/{job_id}').json()['status'] == 'running'
        time.sleep(8)  # the stream closed: the client stops asking
        job = client.wait(job_id)
        assert job['status'] == 'cancelled' and 'abandoned' in job['error']
        assert client.health()['queued'] == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_server_leaves_with_the_process_that_started_it(results_dir, tmp_path):
    """As when Slicer dies: the parent is killed, the server exits by itself and removes its work folder."""
    parent = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    proc, client = start(results_dir, tmp_path, '--parent-pid', str(parent.pid))
    client.health()
    assert proc.poll() is None and len(list((tmp_path / 'tmp').iterdir())) == 1  # its work folder
    parent.kill()
    parent.wait()
    assert proc.wait(10) == 0 and list((tmp_path / 'tmp').iterdir()) == []


def test_a_server_stopped_mid_job_removes_its_files(results_dir, large_case, model3d, tmp_path):
    """SIGTERM (what `kill`, systemd and the Slicer module send) while a job runs: the server cancels it, shuts down
    and leaves no work folder behind."""
    proc, client = start(results_dir, tmp_path)
    job_id = client.explain(model_id(model3d, results_dir), client.upload([str(large_case)]), classes=['lesion'],
                            folds=[0], tta=False)
    deadline = time.monotonic() + 120
    while not any(e['event'] == 'tiles' for e in client._call('GET', f'/jobs/{job_id}/events').json()):
        assert time.monotonic() < deadline, client._call('GET', f'/jobs/{job_id}').json()
        time.sleep(0.1)
    assert client._call('GET', f'/jobs/{job_id}').json()['status'] == 'running'  # 75 tiles: still running
    outcome = {}

    def listen():  # a client listening to the job's events holds a connection open
        try:
            outcome['job'] = client.wait(job_id)
        except CamError as e:
            outcome['error'] = str(e)

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(1)
    proc.terminate()
    assert proc.wait(10) == 128 + 15 and list((tmp_path / 'tmp').iterdir()) == []
    listener.join(30)
    assert 'does not answer' in outcome['error']  # one line, not a hang


def test_the_cache_drops_the_least_recently_used_first_and_keeps_what_was_just_put():
    from nnunetv2_cam_core.server import Cache
    cache = Cache(10)
    for key in 'abc':
        cache.put(key, key.upper(), 4)
    assert list(cache.items) == ['b', 'c'] and cache.bytes() == 8  # a dropped to make room for c
    assert cache.get('b') == 'B'  # now the most recently used
    cache.put('c', 'C2', 5)  # put again: counted once
    assert list(cache.items) == ['b', 'c'] and cache.bytes() == 9
    cache.reserve(2)  # room for 2 more: the least recently used (b) goes
    assert list(cache.items) == ['c'] and cache.get('b') is None
    cache.put('big', 'BIG', 25)  # over the limit alone: it stays, the rest goes
    assert list(cache.items) == ['big'] and cache.get('big') == 'BIG'


@pytest.mark.parametrize('region, corners', [
    ({'kind': 'box'}, [[-3.4, 5.6, 2.0], [4.4, 30.0, 7.5]]),          # partly outside, corners rounded
    ({'kind': 'box'}, [[9.0, 4.0, 8.0], [2.0, 1.0, 3.0]]),            # corners in either order
    ({'kind': 'box'}, [[40.0, 0.0, 0.0], [50.0, 3.0, 3.0]]),          # wholly outside: nothing
    ({'kind': 'point', 'radius_mm': 4.0}, [[1.3, 19.0, 5.2]]),        # a ball cut by two faces
    ({'kind': 'point', 'radius_mm': 2.5}, [[11.0, 7.6, 4.4]]),        # inside, anisotropic spacing
])
def test_a_box_or_ball_is_drawn_as_on_the_whole_grid(region, corners):
    """The region drawn in its bounding box alone equals the same rule applied to every voxel of the image."""
    from nnunetv2_cam_core.server import Region, region_array
    size, spacing = np.array([12, 24, 9]), np.array([0.8, 1.0, 2.5])
    corners = [np.array(c) for c in corners]
    grid = np.indices(size, dtype=float)  # (i, j, k) of every voxel
    if region['kind'] == 'box':
        lo = np.floor(np.minimum(*corners) + 0.5)[:, None, None, None]
        hi = np.floor(np.maximum(*corners) + 0.5)[:, None, None, None]
        every = ((grid >= lo) & (grid <= hi)).all(0)
    else:
        d2 = (((grid - corners[0][:, None, None, None]) * spacing[:, None, None, None]) ** 2).sum(0)
        every = d2 <= region['radius_mm'] ** 2
    drawn = region_array(Region(**region), size, spacing, corners)
    assert drawn.dtype == np.uint8 and drawn.shape == tuple(size[::-1])
    assert np.array_equal(drawn, every.transpose().astype(np.uint8))
    assert drawn.any() == (corners[0][0] < 40)


def test_a_case_needing_more_tiles_than_max_tiles_is_refused_before_it_runs(server, client, large_case, model3d):
    """--max-tiles 200 here: the large case at step 0.1 (several thousand tiles) gets 422 and one line; at 0.5 it runs."""
    url, token, _, results_dir = server
    case = client.upload([str(large_case)])
    r = requests.post(f'{url}/v1/explain', json={'model': model_id(model3d, results_dir), 'case': case,
                                                 'step_size': 0.1, 'folds': [0], 'tta': False},
                      headers={'Authorization': f'Bearer {token}'}, timeout=30)
    assert r.status_code == 422 and '--max-tiles 200' in r.json()['detail'] and '\n' not in r.json()['detail']


def test_duplicate_folds_load_one_network_counted_in_the_cache(server, client, small_case, model3d):
    job = run(client, model_id(model3d, server[3]), client.upload([str(small_case)]), classes=['lesion'],
              folds=[0] * 32, tta=False)
    assert sidecar(client, job)['folds'] == [0]
    h = client.health()
    assert all(len(set(m['folds'])) == len(m['folds']) for m in h['models_loaded'])
    assert h['cache_bytes'] > 0 and h['cache_bytes'] <= h['cache_limit_bytes']


@pytest.mark.parametrize('ending', ['.nii.gz', '.nii', '.mha', '.nrrd'])
def test_nan_voxels_fail_the_job_in_every_format_with_no_server_path(server, client, small_case, model3d, tmp_path,
                                                                     ending):
    img = sitk.ReadImage(str(small_case), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(img)
    a[3, 4, 5] = np.nan
    nan = sitk.GetImageFromArray(a)
    nan.CopyInformation(img)
    path = tmp_path / f'nan_0000{ending}'
    sitk.WriteImage(nan, str(path))
    job = client.wait(client.explain(model_id(model3d, server[3]), client.upload([str(path)]), classes=['lesion'],
                                     folds=[0], tta=False))
    assert job['status'] == 'failed' and '1 NaN/inf voxels' in job['error']
    assert f'nan_0000{ending}' in job['error'] and 'nnunetcam-server' not in job['error']
    assert not re.search(r'(^|[\s(])/', job['error']), job['error']  # no absolute path


def test_no_absolute_server_path_reaches_a_client(server, client, small_case, model3d, tmp_path):
    """Model ids, upload and output names only: in the model list, the job's events, its files and its sidecar."""
    url, token, _, results_dir = server
    model = model_id(model3d, results_dir)
    job = run(client, model, client.upload([str(small_case)]), classes=['lesion'], folds=[0], tta=False)
    seen = json.dumps([client.models(), client.health()['models_loaded'],
                       client._call('GET', f'/jobs/{job["id"]}/events').json(), job, sidecar(client, job)])
    for secret in (str(results_dir), str(tmp_path.parent), '/tmp', os.path.expanduser('~')):
        assert secret not in seen, secret
    s = sidecar(client, job)
    assert s['model'] == model and s['inputs'] == ['small_0000.nii.gz']


@pytest.fixture(scope='module')
def tight(results_dir, tmp_path_factory):
    """A fresh server (no model loaded) allowing two event streams of 2 s each."""
    tmp = tmp_path_factory.mktemp('tight')
    proc, first = start_server(results_dir, tmp, '--max-streams', '2', '--stream-s', '2')
    try:
        yield first['url'], first['token']
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_cancel_reaches_a_job_before_it_preprocesses(tight, large_case, model3d, results_dir):
    """Cancelled while its model loads, the job stops between stages: no preprocessing, no tile."""
    client = ServerClient(*tight)
    job_id = client.explain(model_id(model3d, results_dir), client.upload([str(large_case)]), classes=['lesion'],
                            folds=[0], tta=False)
    deadline = time.monotonic() + 120
    while not client._call('GET', f'/jobs/{job_id}/events').json():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.cancel(job_id)
    job = client.wait(job_id)
    events = client._call('GET', f'/jobs/{job_id}/events').json()
    assert job['status'] == 'cancelled' and events[0] == {'event': 'stage', 'case': None, 'stage': 'load'}
    assert client.health()['counters']['preprocessings'] == 0 and not any(e['event'] == 'tiles' for e in events)


def test_event_streams_are_capped_and_a_stalled_one_is_dropped(tight, large_case, model3d, results_dir):
    """--max-streams 2: two streams that are never read hold both places, a third gets 503 while the server answers
    everything else; after --stream-s 2 the stalled ones are ended and a stream opens again."""
    url, token = tight
    client = ServerClient(url, token)
    job_id = client.explain(model_id(model3d, results_dir), client.upload([str(large_case)]), classes=['lesion'],
                            folds=[0], tta=False)
    port = int(url.rsplit(':', 1)[1])
    stalled = [socket.create_connection(('127.0.0.1', port)) for _ in range(2)]
    for s in stalled:  # ask, and never read
        s.sendall(f'GET /v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n'
                  .encode())
    auth = {'Authorization': f'Bearer {token}'}
    deadline = time.monotonic() + 30
    while client.health()['streams'] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    third = requests.get(f'{url}/v1/jobs/{job_id}/stream', headers=auth, timeout=30)
    assert third.status_code == 503 and 'max-streams' in third.json()['detail'] and third.headers['Retry-After']
    assert client.health()['streams'] == 2
    time.sleep(3)
    assert client.health()['streams'] == 0
    with requests.get(f'{url}/v1/jobs/{job_id}/stream', headers=auth, stream=True, timeout=30) as r:
        assert r.status_code == 200
    for s in stalled:
        s.close()
    client.cancel(job_id)


def test_cli_runs_reuse_the_servers_case_and_upload_nothing_again(server, model3d, tmp_path, capsys):
    """Two CLI runs on the same file, another class second: the second uploads nothing, reuses the preprocessed
    case and the kept layer outputs (no forward), and writes what a local run writes; the case stays on the server
    (--server-forget removes it); a case the server no longer holds is uploaded again."""
    url, token, token_file, results_dir = server
    client = ServerClient(url, token)
    case = write_sample_case(tmp_path / 'in', seed=21, shape=(16, 32, 32), spacing=(1.0, 1.0, 1.8), name='fresh')
    common = ['-i', case, '-f', '0', '--disable_tta', '-m', model_id(model3d, results_dir), '--server', url,
              '--token-file', token_file, '--progress', 'json']
    uploads = client.health()['counters']['uploads']
    assert run_cli([*common, '-o', tmp_path / 's1', '--target-class', 'lesion']) == 0
    assert client.health()['counters']['uploads'] == uploads + 1
    capsys.readouterr()
    assert run_cli([*common, '-o', tmp_path / 's2', '--target-class', 'organ']) == 0
    assert client.health()['counters']['uploads'] == uploads + 1  # nothing uploaded
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(e.get('message') == '1 of 1 case(s) were already on the server' for e in events)
    s2 = json.loads((tmp_path / 's2' / 'fresh_cam.json').read_text())
    assert 'preprocessed case' in s2['server']['reused']
    assert s2['forwards_from_layer_cache'] == s2['tiles'] > 0
    assert run_cli(['-i', case, '-o', tmp_path / 'local', '-m', model3d, '-f', '0', '--disable_tta',
                    '--target-class', 'organ', '-device', 'cpu']) == 0
    assert sorted(p.name for p in (tmp_path / 's2').iterdir()) == sorted(p.name for p in (tmp_path / 'local').iterdir())
    for name in ('fresh.nii.gz', 'fresh_cam_organ_gradcam.nii.gz'):
        assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 's2' / name))),
                           sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'local' / name))), atol=1e-5), name
    case_id = client.find_case([str(case)])
    assert case_id is not None and client.has_case(case_id)
    client.delete_case(case_id)  # as the server's LRU or TTL would
    assert not client.has_case(case_id)
    assert run_cli([*common, '-o', tmp_path / 's3', '--target-class', 'lesion', '--server-forget']) == 0
    assert client.health()['counters']['uploads'] == uploads + 2 and client.find_case([str(case)]) is None


def test_the_slicer_local_server_makes_its_token_in_a_private_folder_and_adopts_none(model3d, tmp_path):
    """A token file planted where the local server's used to be is not adopted; nothing of the token stays."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'NNUNetCAM'))
    from NNUNetCAMLib.environment import PythonEnvironment
    from NNUNetCAMLib.server import LocalServer
    planted = tmp_path / f'nnunetcam-token-{os.getpid()}'
    planted.write_text('p' * 64)
    planted.chmod(0o600)
    local = LocalServer(PythonEnvironment(sys.executable), str(tmp_path))
    try:
        connection = local.connect(str(model3d), 'cpu')
        assert connection.client.session.headers['Authorization'] != 'Bearer ' + 'p' * 64
        connection.client.health()
        assert [p.name for p in tmp_path.iterdir()] == [planted.name]
    finally:
        local.shutdown()
