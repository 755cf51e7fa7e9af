"""Building open_clip models from config dicts: validation, tokenizer, local image weights."""
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from clip_hvt.factory import create_model, create_tokenizer, preprocess_cfg, validate_model_cfg

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 32},
    "text_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 1},
}


def test_builds_open_clip_clip_with_timm_tower_and_preprocess_cfg():
    model = create_model(CFG)
    assert isinstance(model, open_clip.CLIP)
    assert isinstance(model.visual, open_clip.timm_model.TimmModel)
    assert model.visual.preprocess_cfg["size"] == 32 == preprocess_cfg(CFG)["size"]
    assert model.encode_text(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 16)


def test_tokenizer_is_open_clips_simple_tokenizer_with_context_length():
    tok = create_tokenizer(CFG)
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=12)
    text = ["a red circle", "a very long caption " * 10]
    assert torch.equal(tok(text), reference(text)) and tok(text).shape == (2, 12)


@pytest.mark.parametrize("bad, message", [
    ({"vision_cfg": {"timm_model_name": "pvt_v2_bo", "image_size": 32}}, "Close matches: pvt_v2_b"),
    ({"vision_cfg": {"timm_model_name": "pvt_v2_b0", "img_size": 32}}, "did you mean 'image_size'"),
    ({"embedding_dim": 3}, "unknown key(s) in model_cfg: 'embedding_dim'"),
])
def test_bad_config_names_the_problem_and_the_valid_choices(bad, message):
    cfg = {**CFG, **bad}
    with pytest.raises(ValueError) as err:
        validate_model_cfg(cfg)
    assert message in str(err.value)


def test_image_size_the_strides_cannot_take_fails_before_training():
    cfg = {**CFG, "vision_cfg": {"timm_model_name": "pvt_v2_b0", "image_size": 16}}
    with pytest.raises(ValueError, match="vision_cfg.image_size 16 does not fit pvt_v2_b0"):
        create_model(cfg)


def test_image_weights_load_a_local_timm_checkpoint(tmp_path):
    source = timm.create_model("pvt_v2_b0")  # with its ImageNet head: ignored on load
    path = tmp_path / "pvt_v2_b0.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model(CFG, image_weights=str(path))
    for name, tensor in model.visual.trunk.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


def test_image_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(ValueError, match="lacks .* trunk tensors"):
        create_model(CFG, image_weights=str(path))

