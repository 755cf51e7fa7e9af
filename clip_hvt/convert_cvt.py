"""Convert a Hugging Face CvT checkpoint (transformers' CvtModel / CvtForImageClassification) to clip_hvt's
timm layout, checked by a strict load into the named model, and saved as safetensors.

    python -m clip_hvt.convert_cvt --src microsoft-cvt-13/ --out cvt_13.safetensors --model cvt_13

--src is a .safetensors or .bin/.pth file, or a local Hugging Face model directory holding model.safetensors
or pytorch_model.bin. Nothing is downloaded. The result loads with
`timm.create_model('cvt_13', pretrained=True, pretrained_cfg_overlay=dict(file=OUT), num_classes=...)`.
"""
import json
from pathlib import Path
from typing import Dict, Literal

import safetensors.torch
import timm
import torch

from clip_hvt import cli
from clip_hvt.models.cvt import checkpoint_filter_fn

MODELS = ('cvt_13', 'cvt_21', 'cvt_w24')
_DIR_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')


def load_source(src: Path) -> Dict[str, torch.Tensor]:
    """ State dict of a checkpoint file or a local Hugging Face model directory. """
    if src.is_dir():
        found = [src / name for name in _DIR_WEIGHTS if (src / name).is_file()]
        if not found:
            raise cli.UserError(f'{src} holds none of {_DIR_WEIGHTS}; pass the weights file itself.')
        src = found[0]
    if not src.is_file():
        raise cli.UserError(f'No checkpoint at {src}; give a .safetensors/.bin/.pth file or a local HF model directory.')
    if src.suffix == '.safetensors':
        return safetensors.torch.load_file(str(src))
    state_dict = torch.load(src, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):  # training checkpoints nest the weights
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    return state_dict


def convert(state_dict: Dict[str, torch.Tensor], model_name: str) -> Dict[str, torch.Tensor]:
    """ HF CvT state dict -> this layout; raises ValueError when it does not fit `model_name` exactly. """
    head = state_dict.get('classifier.weight')
    num_classes = head.shape[0] if head is not None else 0
    model = timm.create_model(model_name, num_classes=num_classes)
    converted = checkpoint_filter_fn(state_dict, model)
    mismatch = f'The checkpoint does not fit {model_name} (choices: {", ".join(MODELS)})'
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # shape mismatches: another size
        raise cli.UserError(f'{mismatch}: {e}') from e
    if missing or unexpected:
        raise cli.UserError(
            f'{mismatch}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}.')
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def convert_cvt(src: Path, out: Path, model: Literal['cvt_13', 'cvt_21', 'cvt_w24']) -> Path:
    """Convert a Hugging Face CvT checkpoint to clip_hvt's timm layout (safetensors).

    Args:
        src: HF checkpoint file or local HF model directory.
        out: output .safetensors file.
        model: the CvT size the checkpoint is.
    """
    src, out = Path(src), Path(out)
    if out.suffix != '.safetensors':
        raise cli.UserError(f'--out must end in .safetensors, got {out}')
    try:
        state_dict = convert(load_source(src), model)
    except (OSError, RuntimeError) as e:  # unreadable or not a torch/safetensors file
        raise cli.UserError(f'cannot read {src} as a checkpoint ({type(e).__name__}: {e}); give a '
                            'Hugging Face CvT .safetensors/.bin file or model directory') from e
    num_classes = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(model=model, num_classes=str(num_classes), source=str(src))
    safetensors.torch.save_file(state_dict, str(out), metadata=metadata)
    print(json.dumps(dict(out=str(out), tensors=len(state_dict), **metadata)))
    return out


def main(argv=None):
    return cli.run(convert_cvt, argv, prog='python -m clip_hvt.convert_cvt')


if __name__ == '__main__':
    main()
