"""The export's tokenizer is the training tokenizer: open_clip's text tower and a Hugging Face one."""
import open_clip
import pytest
import torch

from clip_hvt.export import export_model
from clip_hvt.factory import create_model, create_tokenizer

CAPTIONS = ["a small red circle on the left", "The STAR is blue, isn't it?", ""]
VISION = {"timm_model_name": "pvt_v2_b0", "image_size": 32}


@pytest.mark.parametrize("text", ["open_clip", "hf_model_name only", "hf_tokenizer_name too"])
def test_open_clip_tokenizer_of_the_export_is_the_training_tokenizer(text, local_hf_text_tower, tmp_path):
    if text == "open_clip":
        text_cfg = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
    else:
        text_cfg = {"context_length": 16, "hf_model_name": str(local_hf_text_tower), "hf_model_pretrained": False,
                    "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}
        if text == "hf_tokenizer_name too":
            text_cfg["hf_tokenizer_name"] = str(local_hf_text_tower)
    cfg = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": text_cfg}
    model = create_model(cfg).eval()
    out = export_model(model, cfg, tmp_path / "export")

    ours = create_tokenizer(cfg)(CAPTIONS)
    theirs = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    assert torch.equal(ours, theirs)
    if text != "open_clip":
        assert ours[0, 1:8].tolist() == [5 + i for i in range(7)]  # the local WordPiece vocabulary, not CLIP's BPE
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(theirs), model.encode_text(ours), atol=1e-6)
