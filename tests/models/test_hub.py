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
            '--no_amp', '--recall_k', '1', '6', '--output', str(tmp_path / 'result.json')]
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    plain = subprocess.run([sys.executable, '-c', 'from clip_benchmark.cli import main; main()', *args],
                           capture_output=True, text=True, env=env)
    assert plain.returncode != 0 and 'Unknown model (pvt_v2_b0_ms)' in plain.stderr  # why the route exists
    ours = subprocess.run([sys.executable, '-c', 'from clip_hvt.hub import clip_benchmark_main; clip_benchmark_main()',
                           *args], capture_output=True, text=True, env=env)
    assert ours.returncode == 0, ours.stderr[-2000:]
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result['dataset'] == 'wds/shapes' and result['task'] == 'zeroshot_retrieval'
    # 6 images and 6 captions: every match is within the top 6, and recall@1 is a fraction of 6 (CLIP_benchmark
    # reports only the --recall_k it is given, default [5], and a K above the set size fails in torch.topk)
    assert result['metrics']['image_retrieval_recall@6'] == result['metrics']['text_retrieval_recall@6'] == 1.0
    assert result['metrics']['image_retrieval_recall@1'] * 6 == pytest.approx(round(result['metrics']['image_retrieval_recall@1'] * 6))


# ---- the hub folder: open_clip export + model card, loadable through `hf-hub:` ------------------------

from conftest import TINY_MODEL_CFG  # noqa: E402

EVALS = [
    {'dataset': 'shapes_zeroshot', 'model': 'x', 'pretrained': '', 'task': 'zeroshot_classification',
     'metrics': {'acc1': 0.28125, 'acc5': 0.71875, 'mean_per_class_recall': 0.2734}, 'samples': 96, 'skipped': {}},
    {'dataset': 'shapes_val', 'model': 'x', 'pretrained': '', 'task': 'zeroshot_retrieval',
     'metrics': {'image_retrieval_recall@1': 0.0625, 'text_retrieval_recall@1': 0.09375,
                 'image_retrieval_recall@5': 0.3125, 'text_retrieval_recall@5': 0.34375}, 'samples': 32, 'skipped': {}},
]


def _run_dir(tmp_path, evals_in_run=True):
    """A run directory as clip_hvt.train leaves it: config.yaml, checkpoints/last.ckpt, metrics.csv, eval JSONs."""
    import yaml
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    # as LightningCLI saves the typed model config: every field, the unset ones null
    saved_cfg = {**TINY_MODEL_CFG, 'init_logit_bias': None,
                 'vision_cfg': {**TINY_MODEL_CFG['vision_cfg'], 'patch_dropout': None, 'pool_type': None},
                 'text_cfg': {**TINY_MODEL_CFG['text_cfg'], 'vocab_size': None, 'pad_id': None}}
    config = {'model': {'model_cfg': saved_cfg}, 'trainer': {'devices': 2, 'num_nodes': 1, 'max_steps': 30},
              'data': {'train_shards': '/data/cc3m/{00000..00331}.tar', 'batch_size': 8}}
    (run / 'config.yaml').write_text(yaml.safe_dump(config))
    torch.save({'hyper_parameters': {'model_cfg': TINY_MODEL_CFG}, 'global_step': 30,
                'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()}}, run / 'checkpoints' / 'last.ckpt')
    (run / 'logs').mkdir()
    (run / 'logs' / 'metrics.csv').write_text('step,train/loss\n9,2.0\n19,1.5\n29,1.2\n')
    eval_dir = run / 'eval' if evals_in_run else tmp_path / 'eval'
    eval_dir.mkdir()
    for e in EVALS:  # clip_hvt.eval --model RUN/checkpoints/last.ckpt
        e = {**e, 'model': str(run / 'checkpoints' / 'last.ckpt')}
        (eval_dir / f"{e['dataset']}_last.ckpt_{e['task']}.json").write_text(json.dumps(e))
    return model, run, eval_dir


def _card_row(card_text, dataset):
    return next(line for line in card_text.splitlines() if line.startswith(f'| {dataset} |'))


def test_hub_folder_loads_through_hf_hub_from_an_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub
    model, run, _ = _run_dir(tmp_path)
    out = hub.folder(str(run), str(tmp_path / 'folder'))
    assert sorted(p.name for p in out.iterdir()) == ['README.md', export.CONFIG_NAME, export.WEIGHTS_NAME]
    # the Hugging Face cache layout hf_hub_download reads offline: refs/main -> snapshots/<rev>/<files>
    cache, rev = tmp_path / 'hf' / 'hub', 'a1' * 20
    snapshot = cache / 'models--someone--tiny-clip' / 'snapshots' / rev
    snapshot.mkdir(parents=True)
    for f in out.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / 'models--someone--tiny-clip' / 'refs').mkdir()
    (cache / 'models--someone--tiny-clip' / 'refs' / 'main').write_text(rev)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    loaded, _, preprocess = open_clip.create_model_and_transforms('hf-hub:someone/tiny-clip')
    tokenizer = open_clip.get_tokenizer('hf-hub:someone/tiny-clip')
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tokenizer(['a red circle', 'a blue square'])
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(text), model.encode_text(text), rtol=0, atol=0)
    assert preprocess.transforms[0].size in (32, [32], (32, 32))


def test_hub_card_holds_costs_training_and_the_eval_numbers(tmp_path):
    from clip_hvt import flops
    _, run, eval_dir = _run_dir(tmp_path, evals_in_run=False)
    ckpt = torch.load(run / 'checkpoints' / 'last.ckpt', weights_only=True)
    del ckpt['global_step']
    torch.save(ckpt, tmp_path / 'no_step.ckpt')
    without = (hub.folder(str(run), str(tmp_path / 'bare'), ckpt=str(tmp_path / 'no_step.ckpt')) / 'README.md').read_text()
    assert 'Model Comparison' not in without  # no eval JSON under the run: no table
    assert '**Steps:** 29' in without and f'**Samples seen:** {29 * 16}' in without  # the last logged step
    # another model's results on the same sets in the same folder (clip_hvt.eval --model A --model B --out)
    for e in EVALS:
        other = {**e, 'model': f"local-dir:{tmp_path / 'other' / 'export'}", 'samples': 7,
                 'metrics': {k: 0.5 for k in e['metrics']}}
        (eval_dir / f"{e['dataset']}_export_{e['task']}.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match=r"--evals .*eval: none of its 4 results is of the published model .*no_step"):
        hub.folder(str(run), str(tmp_path / 'bare'), ckpt=str(tmp_path / 'no_step.ckpt'), evals=[str(eval_dir)])
    card = (hub.folder(str(run), str(tmp_path / 'folder'), evals=[str(eval_dir)]) / 'README.md').read_text()
    assert len([line for line in card.splitlines() if line.startswith('| shapes_')]) == len(EVALS)  # its own only
    costs = flops.model_costs(TINY_MODEL_CFG)
    assert f"per image: {costs['image_flops'] / 1e9:.4g}" in card
    assert f"per caption: {costs['text_flops'] / 1e9:.4g}" in card
    assert f"image tower: {costs['image_params'] / 1e6:.2f}" in card
    assert '`/data/cc3m/{00000..00331}.tar`' in card
    assert '**Global batch size:** 16' in card  # 8 per device x 2 devices
    assert '**Steps:** 30' in card and f'**Samples seen:** {30 * 16}' in card  # the checkpoint's global_step
    header = next(line for line in card.splitlines() if line.startswith('| dataset |'))
    columns = [c.strip() for c in header.strip('|').split('|')]
    for e in EVALS:
        cells = [c.strip() for c in _card_row(card, e['dataset']).strip('|').split('|')]
        assert cells[1] == e['task'] and cells[2] == str(e['samples'])
        for metric, value in e['metrics'].items():
            assert float(cells[columns.index(metric)]) == pytest.approx(value, abs=5e-5)


@pytest.mark.parametrize('devices, num_nodes, world', [('8', 2, 16), ([0, 1], 1, 2), ('0,1', 1, 2)])
def test_hub_card_counts_every_device_as_the_report_does(tmp_path, devices, num_nodes, world):
    """slurm/launch.sh's --trainer.devices "$SLURM_NTASKS_PER_NODE" is saved as a string ('8')."""
    import yaml
    _, run, _ = _run_dir(tmp_path)
    config = yaml.safe_load((run / 'config.yaml').read_text())
    config['trainer'].update(devices=devices, num_nodes=num_nodes)
    (run / 'config.yaml').write_text(yaml.safe_dump(config))
    details = hub.model_card(run, 'me/clip', [], steps=30)['details']
    assert details['Global batch size'] == 8 * world and details['Samples seen'] == 30 * 8 * world


def test_hub_push_without_token_fails_before_any_work(tmp_path, monkeypatch):
    import huggingface_hub
    _, run, _ = _run_dir(tmp_path)
    with pytest.raises(UserError, match=r'--push_to me/clip: the Hugging Face hub is offline \(HF_HUB_OFFLINE'):
        hub.folder(str(run), str(tmp_path / 'folder'), push_to='me/clip')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    monkeypatch.setattr(open_clip, 'push_to_hf_hub', lambda *a, **k: pytest.fail('reached the hub without a token'))
    with pytest.raises(SystemExit, match=r'^python -m clip_hvt.hub folder: error: --push_to me/clip: no Hugging Face '
                                         r'token; run `hf auth login` or set HF_TOKEN$'):
        hub.main(['folder', '--run', str(run), '--out', str(tmp_path / 'folder'), '--push_to', 'me/clip'])
    assert not (tmp_path / 'folder').exists()


def test_hub_push_goes_through_open_clip_push_to_hf_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from open_clip.push_to_hf_hub import generate_readme
    from safetensors.torch import load_file
    _, run, _ = _run_dir(tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: 'hf_test')
    monkeypatch.setattr(open_clip, 'push_to_hf_hub', lambda *a, **k: calls.append((a, k)))
    out = hub.folder(str(run), str(tmp_path / 'folder'), push_to='me/clip', private=True)
    (model, tokenizer, model_cfg, repo), kwargs = calls[0]
    assert len(calls) == 1 and repo == 'me/clip' and kwargs['private'] is True and kwargs['safe_serialization'] is True
    assert model_cfg == json.loads((out / export.CONFIG_NAME).read_text())['model_cfg']
    saved = load_file(out / export.WEIGHTS_NAME)
    assert model.state_dict().keys() == saved.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    assert tokenizer(['a red circle']).shape == (1, TINY_MODEL_CFG['text_cfg']['context_length'])
    # the card open_clip writes on the hub is the local README.md, the eval numbers included
    card = (out / 'README.md').read_text()
    assert generate_readme(dict(kwargs['model_card']), 'clip') == card
    assert "hf-hub:me/clip" in card and '| 0.2812 | 0.7188 |' in _card_row(card, 'shapes_zeroshot')
