"""pvt_v2_*_cl (channels-last token maps) against timm's PVTv2: same state dict, outputs and gradients."""
import json
import subprocess
import sys

import open_clip
import pytest
import timm
import torch

from clip_hvt.export import export_model
from clip_hvt.models.pvt_v2_cl import reference_name


def _pair(name, **kwargs):
    torch.manual_seed(0)
    reference = timm.create_model(name, **kwargs).train()
    faster = timm.create_model(name.replace("_ms", "_cl_ms") if name.endswith("_ms") else f"{name}_cl",
                               **kwargs).train()
    faster.load_state_dict(reference.state_dict())  # strict: timm's keys and shapes
    return reference, faster


def _forward_backward(model, x, weight):
    """A loss that weights every output differently, so every gradient is non-trivial."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    (out * weight).sum().backward()
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_outputs_and_gradients_equal_timms_in_fp32(name):
    reference, faster = _pair(name, num_classes=7, drop_path_rate=0.0)
    assert faster.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 3, 64, 80)  # not square: H and W must not be swapped anywhere
    weight = torch.randn(2, 7)
    out_ref, dx_ref, grads_ref = _forward_backward(reference, x, weight)
    out, dx, grads = _forward_backward(faster, x, weight)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5 * dx_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys()
    for key, grad in grads_ref.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=key)


def test_stage_maps_equal_timms():
    reference, faster = _pair("pvt_v2_b0", num_classes=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps_ref = reference.forward_intermediates(x, intermediates_only=True)
        maps = faster.forward_intermediates(x, intermediates_only=True)
    assert [m.shape for m in maps] == [m.shape for m in maps_ref]
    for m, m_ref in zip(maps, maps_ref):
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)


def test_multiscale_variant_equals_timm_trunks_multiscale():
    reference, faster = _pair("pvt_v2_b0_ms", num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(faster(x), reference(x), rtol=1e-5, atol=1e-5)


def test_reference_name():
    assert reference_name("pvt_v2_b2_cl") == "pvt_v2_b2"
    assert reference_name("pvt_v2_b2_cl_ms") == "pvt_v2_b2_ms"
    assert reference_name("pvt_v2_b2_li_cl") == "pvt_v2_b2_li"
    assert reference_name("pvt_v2_b2") == "pvt_v2_b2" and reference_name("cvt_13") == "cvt_13"


@pytest.mark.slow  # a fresh interpreter importing torch and open_clip
def test_export_of_a_cl_model_loads_in_plain_open_clip_and_timm(tmp_path):
    cfg = {"embed_dim": 16, "vision_cfg": {"timm_model_name": "pvt_v2_b0_cl", "timm_pool": "avg",
                                           "timm_proj": "linear", "image_size": 32},
           "text_cfg": {"context_length": 8, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    export_model(model, cfg, tmp_path)
    assert json.loads((tmp_path / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"][
        "timm_model_name"] == "pvt_v2_b0"
    images = torch.randn(2, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = model.encode_image(images)
    # A fresh interpreter that never imports clip_hvt: open_clip and timm only, strict state-dict load.
    script = (
        "import sys, torch, open_clip\n"
        f"model, _, _ = open_clip.create_model_and_transforms('local-dir:{tmp_path}')\n"
        "assert 'clip_hvt' not in sys.modules\n"
        f"images = torch.load('{tmp_path / 'images.pt'}', weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(model.eval().encode_image(images), '{tmp_path / 'out.pt'}')\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, rtol=1e-5, atol=1e-6)
