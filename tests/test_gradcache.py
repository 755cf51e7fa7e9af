""" gradcache_backward: micro-batched encoding, gradients of the loss over the whole batch. """
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.model import CLIP
from torch.nn.parallel import DistributedDataParallel

import clip_hvt.gradcache
from clip_hvt.gradcache import gradcache_backward
from clip_hvt.loss import build_loss

BATCH, MICRO_BATCH = 16, 4
IMAGE_SIZE, CONTEXT, VOCAB = 32, 16, 100
TOL = 1e-5


def tiny_clip(rng_layers: bool, with_bias: bool = False) -> CLIP:
    """ A timm test ViT image tower and a 2-layer text transformer, in float64, train mode. """
    torch.manual_seed(0)
    drop = 0.2 if rng_layers else 0.
    model = CLIP(
        embed_dim=16,
        vision_cfg=dict(
            timm_model_name='test_vit',
            image_size=IMAGE_SIZE,
            timm_drop=drop,  # dropout before the projection
            timm_drop_path=drop,  # stochastic depth in the trunk
            patch_dropout=drop,  # random token subsets
        ),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2),
        init_logit_bias=-2. if with_bias else None,
    )
    return model.double().train()


def batch(n=BATCH):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=torch.float64)
    texts = torch.randint(1, VOCAB, (n, CONTEXT), generator=g)
    return images, texts


def encoder(model):
    return lambda images, texts: model(images, texts)[:2]


def scale_and_bias(model):
    return model.logit_scale.exp(), model.logit_bias


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_step(model, loss_fn, images, texts, micro_batch_size=None):
    """ The loss and its backward with every activation kept: one forward of the whole batch, or,
    for models that draw random numbers, one forward per micro-batch in GradCache's order. """
    size = micro_batch_size or len(images)
    features = [encoder(model)(i, t) for i, t in zip(images.split(size), texts.split(size))]
    image_f, text_f = (torch.cat(f) for f in zip(*features))
    loss = loss_fn(image_f, text_f, *scale_and_bias(model))
    loss.backward()
    return loss.detach(), grads(model)


def gradcache_step(model, loss_fn, images, texts, micro_batch_size=MICRO_BATCH):
    loss = gradcache_backward(
        encoder(model), images, texts, loss_fn, *scale_and_bias(model), micro_batch_size=micro_batch_size)
    return loss, grads(model)


def max_diff(step, reference):
    (loss, grads), (ref_loss, ref_grads) = step, reference
    assert grads.keys() == ref_grads.keys()
    return max([(loss - ref_loss).abs().item()] + [(grads[k] - ref_grads[k]).abs().max().item() for k in grads])


@pytest.mark.parametrize('loss_name, micro_batch_size', [('clip', 4), ('clip', 5), ('siglip', 4)])
def test_gradcache_equals_one_big_batch(loss_name, micro_batch_size):
    with_bias = loss_name == 'siglip'
    images, texts = batch()
    loss_fn = build_loss(loss_name)
    reference = reference_step(tiny_clip(False, with_bias), loss_fn, images, texts)
    step = gradcache_step(tiny_clip(False, with_bias), loss_fn, images, texts, micro_batch_size)
    assert 'logit_scale' in step[1] and ('logit_bias' in step[1]) == with_bias
    assert max_diff(step, reference) <= TOL


def test_gradcache_replays_dropout_and_drop_path():
    images, texts = batch()
    loss_fn = build_loss('clip')
    torch.manual_seed(2)
    reference = reference_step(tiny_clip(True), loss_fn, images, texts, MICRO_BATCH)
    draw_after_reference = torch.rand(1)
    torch.manual_seed(2)
    step = gradcache_step(tiny_clip(True), loss_fn, images, texts)
    assert max_diff(step, reference) <= TOL
    assert torch.rand(1) == draw_after_reference  # the re-forward leaves later draws alone


def test_without_rng_replay_gradients_differ(monkeypatch):
    """ The replay test above can fail: re-forwarding under fresh random numbers breaks it. """
    monkeypatch.setattr(clip_hvt.gradcache._RngState, 'replay', lambda self: torch.random.fork_rng(devices=[]))
    images, texts = batch()
    loss_fn = build_loss('clip')
    torch.manual_seed(2)
    reference = reference_step(tiny_clip(True), loss_fn, images, texts, MICRO_BATCH)
    torch.manual_seed(2)
    assert max_diff(gradcache_step(tiny_clip(True), loss_fn, images, texts), reference) > 100 * TOL


def test_rejects_bad_micro_batch_and_unpaired_batches():
    images, texts = batch()
    model = tiny_clip(False)
    with pytest.raises(ValueError, match='micro_batch_size must be >= 1, got 0'):
        gradcache_step(model, build_loss('clip'), images, texts, micro_batch_size=0)
    with pytest.raises(ValueError, match='same batch size, got 16 and 15'):
        gradcache_step(model, build_loss('clip'), images, texts[:15])


WORLD = 2


def _ddp_worker(rank, store, out_path):
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD)
    images, texts = batch()
    local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    model = DistributedDataParallel(tiny_clip(False))
    loss = gradcache_backward(
        encoder(model), images[local], texts[local], build_loss('clip', rank, WORLD),
        *scale_and_bias(model.module), micro_batch_size=MICRO_BATCH, no_sync=model.no_sync,
    )
    dist.all_reduce(loss)
    if rank == 0:
        torch.save((loss / WORLD, grads(model.module)), out_path)
    dist.destroy_process_group()


def test_gradcache_under_ddp_equals_one_process_on_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(tmp_path / 'store', tmp_path / 'result.pt'), nprocs=WORLD)
    images, texts = batch()
    reference = reference_step(tiny_clip(False), build_loss('clip'), images, texts)
    assert max_diff(torch.load(tmp_path / 'result.pt', weights_only=True), reference) <= TOL
