"""The SLURM array script: checked without a cluster (its arguments per task), and on a real one-node SLURM on
localhost (Debian's slurm-wlm and munge, started by scripts/slurm/local_cluster.sh), where an array of 2 tasks over
4 cases gives the same files as one local run. The real cluster needs slurm-wlm and root; without them that test is
skipped, except under `make test-slurm` (NNUNETCAM_SLURM=1), which installs them and requires it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_outputs, cam_args, run_cli, write_cohort

ROOT = Path(__file__).resolve().parent.parent
ARRAY = ROOT / 'scripts' / 'slurm' / 'nnunetcam_array.sbatch'
CLUSTER = ROOT / 'scripts' / 'slurm' / 'local_cluster.sh'


def task(env: dict, *args) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
    return subprocess.run(['bash', str(ARRAY), *args], env={**clean, 'NNUNETCAM_PYTHON': 'echo', **env},
                          capture_output=True, text=True)


def test_array_script_gives_each_task_its_part():
    array = {'SLURM_ARRAY_JOB_ID': '7', 'SLURM_ARRAY_TASK_MIN': '0', 'SLURM_ARRAY_TASK_MAX': '2',
             'SLURM_ARRAY_TASK_COUNT': '3'}
    for i in range(3):
        r = task({**array, 'SLURM_ARRAY_TASK_ID': str(i)}, '-i', 'in', '-o', 'out', '-m', 'model')
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == f'-m nnunetv2_cam_core -i in -o out -m model -num_parts 3 -part_id {i}'
    r = task({})
    assert r.returncode == 2 and 'sbatch --array=0-(N-1)' in r.stderr
    r = task({**array, 'SLURM_ARRAY_TASK_ID': '1', 'SLURM_ARRAY_TASK_MIN': '1'})
    assert r.returncode == 2 and 'must be 0-(N-1)' in r.stderr


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    required = os.environ.get('NNUNETCAM_SLURM') == '1'
    why = 'slurm-wlm and munge are not installed (make test-slurm installs them)' \
        if not all(shutil.which(t) for t in ('slurmctld', 'slurmd', 'sbatch', 'munged')) else \
        'a local SLURM needs root (slurmd starts jobs as their user)' if os.geteuid() != 0 else None
    if why:
        (pytest.fail if required else pytest.skip)(why)
    folder = tmp_path_factory.mktemp('slurm')
    started = subprocess.run(['bash', str(CLUSTER), 'start', str(folder)], capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr
        yield {**os.environ, 'SLURM_CONF': str(folder / 'slurm.conf')}
    finally:
        subprocess.run(['bash', str(CLUSTER), 'stop', str(folder)])


def test_array_of_two_tasks_on_a_real_slurm_equals_one_local_run(slurm, model3d, tmp_path):
    inputs = write_cohort(tmp_path / 'in', range(21, 25))
    assert run_cli(cam_args(model3d, inputs, tmp_path / 'local', '--progress', 'none')) == 0
    logs = tmp_path / 'logs'
    logs.mkdir()
    r = subprocess.run(['sbatch', '--wait', '--array=0-1', '--cpus-per-task=1', '--mem=3G', '--time=00:20:00',
                        f'--output={logs}/task_%A_%a.log', str(ARRAY),
                        *cam_args(model3d, inputs, tmp_path / 'slurm')],
                       env={**slurm, 'NNUNETCAM_PYTHON': sys.executable,
                            'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))},
                       cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    texts = [p.read_text() for p in sorted(logs.iterdir())]
    assert r.returncode == 0, (r.stderr, [t[-2000:] for t in texts])
    assert len(texts) == 2 and all('\r' not in t for t in texts)
    assert [t.splitlines()[0].split(' on ')[0] for t in texts] == ['part 0 of 2', 'part 1 of 2']
    assert_same_outputs(tmp_path / 'local', tmp_path / 'slurm', 4)
