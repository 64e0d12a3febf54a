"""Information commands: --list-methods (no other argument), --list-layers (-m only), check-env."""
import json
import subprocess
import sys

import numpy as np


def cli(*args):
    return subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', *map(str, args)], capture_output=True, text=True)


def test_list_methods_alone():
    p = cli('--list-methods')
    assert p.returncode == 0
    assert 'gradcam' in p.stdout and 'hirescam' in p.stdout and 'unavailable' in p.stdout
    rows = json.loads(cli('--list-methods', '--progress', 'json').stdout)
    assert rows['gradcam'].startswith('native')


def test_list_layers_marks_bottleneck_and_decoder(model3d):
    p = cli('--list-layers', '-m', model3d, '-device', 'cpu', '--progress', 'json')
    assert p.returncode == 0, p.stderr
    rows = {r['name']: r for r in json.loads(p.stdout)}
    arch = json.loads((model3d / 'plans.json').read_text())['configurations']['3d_fullres']['architecture']
    kw = arch['arch_kwargs']
    last = kw['n_stages'] - 1
    assert rows[f'encoder.stages.{last}']['mark'] == 'bottleneck'
    assert rows['decoder.stages.0']['mark'] == 'decoder stage 0'
    assert rows[f'decoder.stages.{last - 1}']['mark'] == f'decoder stage {last - 1} (default)'
    expected_stride = [float(x) for x in np.prod(np.array(kw['strides']), axis=0)]
    assert rows[f'encoder.stages.{last}']['stride'] == expected_stride
    assert rows[f'encoder.stages.{last}']['shape'][0] == kw['features_per_stage'][-1]
    assert rows[f'decoder.stages.{last - 1}']['shape'][0] == kw['features_per_stage'][0]
    text = cli('--list-layers', '-m', model3d, '-device', 'cpu')
    assert f'decoder stage {last - 1} (default)' in text.stdout


def test_check_env():
    p = cli('check-env')
    info = json.loads(p.stdout)
    assert p.returncode == 0 and 'torch' in info['versions'] and 'cpu' in info['devices']
    assert isinstance(info['cuda_available'], bool)


def test_missing_input_is_usage_error():
    p = cli('-o', 'x')
    assert p.returncode == 2 and p.stderr.strip().startswith('error: ') and '-i INPUT' in p.stderr


def test_compiled_model_loads_into_plain_networks(model3d, small_case, monkeypatch):
    """nnUNet_compile=1: nnU-Net hands back a torch.compile wrapper (its state-dict keys and layer names carry
    `_orig_mod.`). Each fold loads into the plain module, layer names work with or without the prefix, and
    --list-layers lists plain names."""
    import os
    import torch
    from torch._dynamo.eval_frame import OptimizedModule
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.model import load_predictor
    monkeypatch.setenv('nnUNet_compile', '1')
    pred = load_predictor(model3d, [0, 1], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    assert isinstance(pred.network, OptimizedModule)
    engine = CamEngine(pred, target_layer=['_orig_mod.decoder.stages.0', 'bottleneck'], target_region='all')
    assert engine.layers[0] == 'decoder.stages.0' and not engine.layers[1].startswith('_orig_mod')
    assert not any(isinstance(n, OptimizedModule) for n in engine.networks)
    data, props, _, _ = engine.preprocess([str(small_case)])
    res = engine.run(data, props)
    assert np.isfinite(res.cams['lesion']).all() and res.cams['lesion'].max() == 1
    p = subprocess.run([sys.executable, '-m', 'nnunetv2_cam_core', '--list-layers', '-m', str(model3d), '-device', 'cpu',
                        '--progress', 'json'], capture_output=True, text=True, env={**os.environ, 'nnUNet_compile': '1'})
    assert p.returncode == 0, p.stderr[-2000:]
    names = [r['name'] for r in json.loads(p.stdout)]
    assert 'decoder.stages.0' in names and not any(n.startswith('_orig_mod') for n in names)


def test_a_run_on_a_server_imports_no_torch(tmp_path):
    """`--server` runs are mostly start-up once the server holds the case: that path loads neither torch nor
    nnU-Net (a server that does not answer ends it after the path has been taken)."""
    token = tmp_path / 'token'
    token.write_text('x' * 40)
    code = ('import sys; from nnunetv2_cam_core.cli import main; '
            f'rc = main(["--server", "http://127.0.0.1:9", "--token-file", {str(token)!r}, "-m", "M", '
            f'"-i", {str(tmp_path)!r}, "-o", {str(tmp_path / "out")!r}]); '
            'print(rc, "torch" in sys.modules, "nnunetv2" in sys.modules)')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert 'does not answer' in p.stderr
    assert p.stdout.split() == ['1', 'False', 'False'], p.stdout + p.stderr
