""" The image trunk alone as a timm checkpoint: timm rebuilds it with identical features, also features_only. """
import json
import os
import subprocess
import sys

import open_clip
import pytest
import timm
import torch

from clip_hvt import export, hub
from clip_hvt.cli import UserError

TEXT = dict(context_length=16, width=32, heads=2, layers=1)  # open_clip's vocabulary: CLIP_benchmark tokenizes


def _clip_export(tmp_path, vision_cfg):
    torch.manual_seed(0)
    model_cfg = dict(embed_dim=32, vision_cfg=dict(image_size=64, timm_proj='linear', **vision_cfg), text_cfg=TEXT)
    model = open_clip.CLIP(**model_cfg).eval()
    for p in model.visual.trunk.parameters():  # non-default values everywhere, so a fresh init cannot pass
        p.data.add_(torch.randn_like(p) * 0.01)
    return model, export.export_model(model, model_cfg, tmp_path / 'export')


@pytest.mark.parametrize('vision_cfg', [
    dict(timm_model_name='pvt_v2_b0_ms', timm_pool='attn:grid=2'),
    dict(timm_model_name='cvt_13', timm_pool='avg'),
])
def test_timm_checkpoint_loads_with_identical_features(tmp_path, vision_cfg):
    model, src = _clip_export(tmp_path, vision_cfg)
    out = hub.export_timm(str(src), str(tmp_path / 'timm'))
    config = json.loads((out / 'config.json').read_text())
    name = vision_cfg['timm_model_name']
    assert config['architecture'] == name
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    trunk = model.visual.trunk
    with torch.no_grad():
        expected = trunk.forward_features(x)
        expected_pooled = trunk(x)
        expected_maps = trunk.forward_intermediates(x, intermediates_only=True)

        local = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        torch.testing.assert_close(local.forward_features(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(local(x), expected_pooled, rtol=0, atol=0)

        by_file = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')),
            **config['model_args']).eval()
        torch.testing.assert_close(by_file(x), expected_pooled, rtol=0, atol=0)

        features = timm.create_model(
            name, pretrained=True, features_only=True,
            pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')), **config['model_args']).eval()
        torch.testing.assert_close(features(x), expected_maps, rtol=0, atol=0)


def test_export_of_an_unregistered_trunk_says_to_import_clip_hvt(tmp_path):
    _, src = _clip_export(tmp_path, dict(timm_model_name='pvt_v2_b0_ms', timm_pool='avg'))
    # an encoder name timm does not know, as for a `_ms` export read where clip_hvt was never imported
    config = json.loads((src / export.CONFIG_NAME).read_text())
    config['model_cfg']['vision_cfg']['timm_model_name'] = 'not_registered_ms'
    (src / export.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(UserError, match="'not_registered_ms' .* not registered in timm: `import clip_hvt` first"):
        hub.export_timm(str(src), str(tmp_path / 'timm'))


def test_export_timm_command_reports_a_missing_source(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'clip_hvt.hub', '--src', str(tmp_path / 'nope'), '--out', str(tmp_path / 'o')],
        capture_output=True, text=True)
    assert result.returncode != 0
    assert "does not exist; give an open_clip export dir or a .ckpt" in result.stderr
    assert 'Traceback' not in result.stderr


def _wds_retrieval(root, num=6, size=32):
    """A CLIP_benchmark `wds/` retrieval set: test/0.tar (jpg + txt captions), dataset_type.txt."""
    import io
    import tarfile

    from PIL import Image
    (root / 'test').mkdir(parents=True)
    (root / 'test' / 'nshards.txt').write_text('1')
    (root / 'dataset_type.txt').write_text('retrieval')
    with tarfile.open(root / 'test' / '0.tar', 'w') as tar:
        for i in range(num):
            color = [(255, 0, 0), (0, 255, 0), (0, 0, 255)][i % 3]
            buf = io.BytesIO()
            Image.new('RGB', (size, size), color).save(buf, format='JPEG')
            caption = f"a {['red', 'green', 'blue'][i % 3]} square number {i}".encode()
            for ext, data in (('jpg', buf.getvalue()), ('txt', caption)):
                info = tarfile.TarInfo(f'{i:04d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_clip_hvt_benchmark_runs_clip_benchmark_on_an_export_with_our_trunk(tmp_path):
    pytest.importorskip('clip_benchmark', reason="CLIP_benchmark not installed: pip install 'clip_hvt[benchmark]'")
    _, src = _clip_export(tmp_path, dict(timm_model_name='pvt_v2_b0_ms', timm_pool='avg'))
    _wds_retrieval(tmp_path / 'set')
    args = ['eval', '--dataset', 'wds/shapes', '--dataset_root', str(tmp_path / 'set'), '--task', 'zeroshot_retrieval',
            '--model', f'local-dir:{src}', '--pretrained', '', '--batch_size', '3', '--num_workers', '0',
            '--no_amp', '--output', str(tmp_path / 'result.json')]
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    plain = subprocess.run([sys.executable, '-c', 'from clip_benchmark.cli import main; main()', *args],
                           capture_output=True, text=True, env=env)
    assert plain.returncode != 0 and 'Unknown model (pvt_v2_b0_ms)' in plain.stderr  # why the route exists
    ours = subprocess.run([sys.executable, '-c', 'from clip_hvt.hub import clip_benchmark_main; clip_benchmark_main()',
                           *args], capture_output=True, text=True, env=env)
    assert ours.returncode == 0, ours.stderr[-2000:]
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result['dataset'] == 'wds/shapes' and result['task'] == 'zeroshot_retrieval'
    # 6 images and 6 captions: every match is within the top 10, and recall@1 is a fraction of 6
    assert result['metrics']['image_retrieval_recall@10'] == result['metrics']['text_retrieval_recall@10'] == 1.0
    assert result['metrics']['image_retrieval_recall@1'] * 6 == pytest.approx(round(result['metrics']['image_retrieval_recall@1'] * 6))
