""" The image trunk alone as a timm checkpoint: timm rebuilds it with identical features, also features_only. """
import json
import subprocess
import sys

import open_clip
import pytest
import timm
import torch

from clip_hvt import export, hub
from clip_hvt.cli import UserError

TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)


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
