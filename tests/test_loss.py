""" build_loss: distributed losses whose DDP step equals the single-process step on the global batch.

One spawn of WORLD gloo processes computes every loss variant (correct and deliberately broken)
under torch DDP; the tests compare each with one process on the concatenated batch.
WORLD=2 runs SigLIP's single shift exchange; _ddp_worker takes the world size, so its
bidirectional exchange (3+ ranks) is checked by spawning 3 or 4 ranks the same way.
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip_hvt.loss import LOSS_NAMES, build_loss

WORLD = 2
LOCAL_BATCH = 4
IN_DIM, EMBED_DIM = 8, 6
TOL = 1e-5


class TwoTowers(nn.Module):
    """ Linear image and text towers with open_clip's outputs: normalized features, exp'd scale, bias. """

    def __init__(self, with_bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(IN_DIM, EMBED_DIM)
        self.text = nn.Linear(IN_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.)) if with_bias else None
        self.double()

    def forward(self, images, texts):
        return (
            F.normalize(self.image(images), dim=-1),
            F.normalize(self.text(texts), dim=-1),
            self.logit_scale.exp(),
            self.logit_bias,
        )


def global_batch(world=WORLD):
    g = torch.Generator().manual_seed(1)
    n = world * LOCAL_BATCH
    return tuple(torch.randn(n, IN_DIM, generator=g, dtype=torch.float64) for _ in range(2))


class _UnshiftedLabelsClipLoss(ClipLoss):
    """ Broken: every rank labels its rows 0..local-1, though its positives sit at rank * local + i. """

    def get_ground_truth(self, device, num_logits):
        return torch.arange(num_logits, device=device)


def _divided_by_world(rank, world):
    """ Broken: 'undoes' DDP's averaging a second time, scaling every gradient by 1 / world. """
    loss_fn = build_loss('clip', rank, world)
    return lambda *args: loss_fn(*args) / world


# name -> (reference loss on one process, loss factory(rank, world_size))
VARIANTS = {
    'clip': ('clip', lambda r, w: build_loss('clip', r, w)),
    'siglip': ('siglip', lambda r, w: build_loss('siglip', r, w)),
    'clip_gather_without_grad': (
        'clip', lambda r, w: ClipLoss(local_loss=True, gather_with_grad=False, rank=r, world_size=w)),
    'clip_divided_by_world': ('clip', _divided_by_world),
    'clip_unshifted_labels': (
        'clip', lambda r, w: _UnshiftedLabelsClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=w)),
    'siglip_local_negatives_only': ('siglip', lambda r, w: SigLipLoss(rank=0, world_size=1)),
}
BROKEN = [name for name in VARIANTS if name not in LOSS_NAMES]


def loss_and_grads(model, loss_fn, images, texts):
    """ Loss and every parameter's gradient after one backward. """
    model.zero_grad()
    loss = loss_fn(*model(images, texts))
    loss.backward()
    module = getattr(model, 'module', model)
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


def _ddp_worker(rank, world, store, out_path):
    torch.set_num_threads(1)  # the ranks share the test machine's cores
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    images, texts = global_batch(world)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for name, (reference, make_loss) in VARIANTS.items():
        model = DistributedDataParallel(TwoTowers(with_bias=reference == 'siglip'))
        loss, grads = loss_and_grads(model, make_loss(rank, world), images[local], texts[local])
        dist.all_reduce(loss)  # the global-batch loss is the mean of the ranks' losses
        results[name] = (loss / world, grads)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    mp.spawn(_ddp_worker, args=(WORLD, tmp / 'store', tmp / 'results.pt'), nprocs=WORLD)
    return torch.load(tmp / 'results.pt', weights_only=True)


@pytest.fixture(scope='module')
def single_process():
    images, texts = global_batch()
    return {
        name: loss_and_grads(TwoTowers(with_bias=name == 'siglip'), build_loss(name), images, texts)
        for name in LOSS_NAMES
    }


def mismatch(ddp, reference):
    """ Max abs difference of the losses and of the gradients, over every parameter. """
    (loss, grads), (ref_loss, ref_grads) = ddp, reference
    assert grads.keys() == ref_grads.keys()
    grad_diff = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    return (loss - ref_loss).abs().item(), grad_diff


@pytest.mark.parametrize('name', LOSS_NAMES)
def test_ddp_local_loss_equals_single_process_on_global_batch(ddp_results, single_process, name):
    loss_diff, grad_diff = mismatch(ddp_results[name], single_process[name])
    assert loss_diff <= TOL and grad_diff <= TOL


@pytest.mark.parametrize('name', BROKEN)
def test_parity_check_detects_broken_distributed_loss(ddp_results, single_process, name):
    reference = VARIANTS[name][0]
    _, grad_diff = mismatch(ddp_results[name], single_process[reference])
    assert grad_diff > 100 * TOL


def test_single_process_clip_loss_is_symmetric_infonce():
    image_f, text_f = F.normalize(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)
    logits = 7. * image_f @ text_f.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(build_loss('clip')(image_f, text_f, torch.tensor(7.)), expected)


def test_siglip_accepts_missing_bias():
    image_f, text_f = F.normalize(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)
    loss_fn = build_loss('siglip')
    torch.testing.assert_close(
        loss_fn(image_f, text_f, torch.tensor(7.)),
        loss_fn(image_f, text_f, torch.tensor(7.), torch.tensor(0.)),
    )


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError, match="'infonce'.*clip, siglip"):
        build_loss('infonce')


def test_rank_outside_world_is_rejected():
    with pytest.raises(ValueError, match='rank=2, world_size=2'):
        build_loss('clip', rank=2, world_size=2)
