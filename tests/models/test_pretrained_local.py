"""Pretrained image-tower weights from local files, offline, through timm's own loader.

Recipe: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH), num_classes=N)
with PATH a .safetensors/.pth in timm layout (timm's PVTv2 release files; for CvT the output of
`python -m clip_hvt.convert_cvt`). timm drops the checkpoint's classifier when num_classes differs from 1000.
"""
import safetensors.torch
import timm
import torch
from transformers import CvtConfig, CvtForImageClassification

import clip_hvt.models.cvt  # noqa: F401  (registers cvt_13)
from clip_hvt.convert_cvt import main as convert_main


def assert_loaded_exactly(model, state_dict, skip=()):
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict) - set(skip)  # nothing left at random init
    for key, value in loaded.items():
        assert torch.equal(value, state_dict[key]), key


def test_pvt_v2_b0_loads_a_local_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    torch.manual_seed(0)
    source = timm.create_model('pvt_v2_b0').state_dict()
    safetensors.torch.save_file(source, str(tmp_path / 'pvt.safetensors'))
    torch.save(source, tmp_path / 'pvt.pth')

    for path in (tmp_path / 'pvt.safetensors', tmp_path / 'pvt.pth'):
        torch.manual_seed(1)  # a different random init, so equality proves the load
        model = timm.create_model('pvt_v2_b0', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        assert_loaded_exactly(model, source)
    headless = timm.create_model(
        'pvt_v2_b0', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0)
    assert_loaded_exactly(headless, source, skip=('head.weight', 'head.bias'))


def test_cvt_13_loads_a_converted_hf_checkpoint_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    torch.manual_seed(0)
    hf = CvtForImageClassification(CvtConfig(num_labels=1000)).eval()
    torch.save(hf.state_dict(), tmp_path / 'pytorch_model.bin')
    path = tmp_path / 'cvt_13.safetensors'
    convert_main(['--src', str(tmp_path / 'pytorch_model.bin'), '--out', str(path), '--model', 'cvt_13'])
    converted = safetensors.torch.load_file(str(path))

    torch.manual_seed(1)
    model = timm.create_model('cvt_13', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert_loaded_exactly(model, converted)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)

    # the HF layout itself also loads: timm runs checkpoint_filter_fn on it
    direct = timm.create_model(
        'cvt_13', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'pytorch_model.bin')),
        num_classes=0)
    assert_loaded_exactly(direct, converted, skip=('head.weight', 'head.bias'))
