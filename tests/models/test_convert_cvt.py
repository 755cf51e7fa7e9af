"""Hugging Face CvT -> clip_hvt CvT: parity with transformers for every size, and the convert command."""
import functools
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from transformers import CvtConfig, CvtForImageClassification, CvtModel

from clip_hvt.convert_cvt import main as convert_main
from clip_hvt.models.cvt import checkpoint_filter_fn

# the published HF configs (microsoft/cvt-13, cvt-21, cvt-w24-384-22k); the rest are CvtConfig defaults
HF_LAYOUTS = {
    'cvt_13': dict(depth=[1, 2, 10], embed_dim=[64, 192, 384], num_heads=[1, 3, 6]),
    'cvt_21': dict(depth=[1, 4, 16], embed_dim=[64, 192, 384], num_heads=[1, 3, 6]),
    'cvt_w24': dict(depth=[2, 2, 20], embed_dim=[192, 768, 1024], num_heads=[3, 12, 16]),
}
# the full width with fewer blocks keeps the forward fast; transformers needs depth[i] > i (it indexes its
# per-stage drop-path list by stage)
SHALLOW = (1, 2, 3)


def hf_config(name, depth=None, num_labels=10):
    layout = dict(HF_LAYOUTS[name], **({'depth': list(depth)} if depth else {}))
    return CvtConfig(**layout, num_labels=num_labels, drop_path_rate=[0.0, 0.0, 0.0])


def randomise_norms(model):
    """ Non-trivial BatchNorm statistics and norm affines, so that a swapped norm cannot go unnoticed. """
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith('running_mean') or (t.ndim == 1 and name.endswith('bias')):
                t.normal_(0, 0.2)
            elif name.endswith('running_var') or (t.ndim == 1 and name.endswith('weight')):
                t.uniform_(0.5, 1.5)
    return model


@functools.lru_cache  # building transformers' CvT is the slow part; tests share read-only instances
def hf_classifier(name, depth=None, num_labels=10):
    torch.manual_seed(0)
    return randomise_norms(CvtForImageClassification(hf_config(name, depth, num_labels))).eval()


@pytest.mark.parametrize('name,depth', [('cvt_13', None), ('cvt_21', None), ('cvt_w24', SHALLOW)])
def test_converted_weights_reproduce_transformers(name, depth):
    hf = hf_classifier(name, depth)
    ours = timm.create_model(name, num_classes=10, **({'depths': depth} if depth else {})).eval()
    ours.load_state_dict(checkpoint_filter_fn(hf.state_dict(), ours), strict=True)

    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        ref_cls = hf.cvt(x).cls_token_value[:, 0]
        final, maps = ours.forward_intermediates(x)
        logits = ours.forward_head(final)
    for ours_map, ref_map in zip(maps, ref.hidden_states, strict=True):
        torch.testing.assert_close(ours_map, ref_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(final[:, 0], hf.layernorm(ref_cls), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-4)


def test_parity_holds_in_train_mode_with_batch_statistics():
    hf = hf_classifier('cvt_13', SHALLOW, num_labels=9).train()  # its own instance: train mode mutates it
    ours = timm.create_model('cvt_13', num_classes=9, depths=SHALLOW).train()
    ours.load_state_dict(checkpoint_filter_fn(hf.state_dict(), ours))
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-4)
    ours_state = ours.state_dict()
    for key, value in checkpoint_filter_fn(hf.state_dict(), ours).items():  # same running-stat updates
        torch.testing.assert_close(ours_state[key], value, rtol=0, atol=1e-5, msg=key)


def test_full_size_w24_converts_key_for_key():
    with torch.device('meta'):  # 277M parameters: layout and shapes only
        hf = CvtForImageClassification(hf_config('cvt_w24', num_labels=1000))
        ours = timm.create_model('cvt_w24')
    converted = checkpoint_filter_fn(hf.state_dict(), ours)
    expected = ours.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    ours.load_state_dict(converted, strict=True, assign=True)


@functools.lru_cache
def hf_headless():
    torch.manual_seed(0)
    return CvtModel(hf_config('cvt_13'), add_pooling_layer=False)


def test_headless_cvtmodel_checkpoint_gets_identity_final_norm():
    hf = hf_headless()
    ours = timm.create_model('cvt_13', num_classes=0)
    converted = checkpoint_filter_fn(hf.state_dict(), ours)
    ours.load_state_dict(converted, strict=True)
    assert torch.equal(ours.norm.weight, torch.ones(384)) and torch.equal(ours.norm.bias, torch.zeros(384))


def test_convert_command_writes_a_strictly_loadable_file(tmp_path):
    hf = hf_classifier('cvt_13')
    hf.save_pretrained(tmp_path / 'hf')  # a local HF model dir: config.json + model.safetensors
    out = tmp_path / 'cvt_13.safetensors'
    convert_main(['--src', str(tmp_path / 'hf'), '--out', str(out), '--model', 'cvt_13'])

    state_dict = safetensors.torch.load_file(str(out))
    ours = timm.create_model('cvt_13', num_classes=10).eval()
    ours.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-4)


def test_convert_command_runs_as_module_on_a_bin_file(tmp_path):
    hf = hf_headless()
    torch.save(hf.state_dict(), tmp_path / 'pytorch_model.bin')
    out = tmp_path / 'out' / 'cvt_13.safetensors'
    subprocess.run(
        [sys.executable, '-m', 'clip_hvt.convert_cvt', '--src', str(tmp_path / 'pytorch_model.bin'),
         '--out', str(out), '--model', 'cvt_13'],
        check=True, capture_output=True, text=True)
    state_dict = safetensors.torch.load_file(str(out))
    timm.create_model('cvt_13', num_classes=0).load_state_dict(state_dict, strict=True)
    torch.testing.assert_close(state_dict['stages.2.cls_token'], hf.state_dict()['encoder.stages.2.cls_token'])


def test_convert_command_rejects_the_wrong_size(tmp_path):
    safetensors.torch.save_file(hf_headless().state_dict(), str(tmp_path / 'cvt13.safetensors'))
    with pytest.raises(SystemExit, match='does not fit cvt_21.*missing keys'):
        convert_main(['--src', str(tmp_path / 'cvt13.safetensors'), '--out', str(tmp_path / 'x.safetensors'),
                      '--model', 'cvt_21'])
    with pytest.raises(SystemExit, match='model.safetensors'):
        convert_main(['--src', str(tmp_path), '--out', str(tmp_path / 'x.safetensors'), '--model', 'cvt_13'])
