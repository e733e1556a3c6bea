"Tests of the training recipe: 'original' is the authors' training step, 'ours' is unchanged, each choice overrides."
import copy, math, os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask
from transformers.optimization import Adafactor

from alcap.adafactor import SyncFreeAdafactor
from alcap.data import Collator
from alcap.train import (RECIPES, Dist, TrainConfig, build_model, build_optimizer, load_checkpoint, save_checkpoint,
                         train_step, validate)

PAD, BOS, EOS, VOCAB, D_M, L_M = 1, 0, 2, 60, 16, 12


class Tok:
    "What build_model reads of a tokenizer."
    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS
    def __len__(self): return VOCAB


def config(**kw):
    base = dict(dataset='jsonl', method='alcap', alpha=0.02, model_size='tiny', text_init='random', dropout=0.0,
                batch_size=4, lr=1e-3, max_source_len=24, max_target_len=16, num_beams=1, max_new_tokens=4,
                val_generate_n=0)
    return validate(TrainConfig(**{**base, **kw}).resolve(), check_files=False)


def fixed_batch(seed=0):
    "Four items of three songs (items 1 and 2 share one), lyrics and captions of different lengths, 12 music frames each."
    rng = np.random.default_rng(seed)
    tokens = lambda k: [BOS] + rng.integers(3, VOCAB, k).tolist() + [EOS]
    items = [dict(input_ids=tokens(9 - 2 * i), labels=tokens(6 + 2 * i)[1:], song_idx=[0, 1, 1, 3][i],
                  h_m=rng.standard_normal((L_M, D_M)).astype(np.float32)) for i in range(4)]
    return Collator(pad_token_id=PAD, multiple=8, max_source_len=24, max_target_len=16)(items)


def model_for(c, seed=0):
    torch.manual_seed(seed)
    return build_model(c, Tok(), D_M)


def step(c, model, batch):
    opt, sched = build_optimizer(c, model, 10)
    return {k: v.item() for k, v in train_step(model, model, batch, opt, sched, c, torch.device('cpu')).items()}


def original_loss(model, batch, c):
    "The authors' objective written out: pads in both means, one fusion attention for both layers, NT-Xent, alpha."
    ids = F.pad(batch['input_ids'], (0, c.max_source_len - batch['input_ids'].shape[1]), value=PAD)  # split-wide padding
    mask = ids.ne(PAD).long()
    labels = batch['labels'].masked_fill(batch['labels'] == -100, PAD)                                # pad ids, not -100
    labels = F.pad(labels, (0, c.max_target_len - labels.shape[1]), value=PAD)
    h_m = batch['music_features']
    enc = model.model.encoder
    x = enc.embed_tokens(ids)
    h = enc.layernorm_embedding(x + enc.embed_positions(ids))
    mask4d = create_bidirectional_mask(config=enc.config, inputs_embeds=x, attention_mask=mask)
    attn = model.fusion[0].attn                       # the one module (_linear_1/2/3 + _multi_head_attn)
    d = h.shape[-1]
    fusion_layers = [len(enc.layers) - 2, len(enc.layers) - 1]
    for i, layer in enumerate(enc.layers):
        h = layer(h, mask4d)
        if i == fusion_layers[0] - 1: h_t = h         # encoder_hidden_states[contrast_layer]: before any fusion
        if i in fusion_layers:                        # Q from the text, K and V from the music, no mask, one head
            q = F.linear(h, attn.q_proj_weight, attn.in_proj_bias[:d])
            k = F.linear(h_m, attn.k_proj_weight, attn.in_proj_bias[d:2 * d])
            v = F.linear(h_m, attn.v_proj_weight, attn.in_proj_bias[2 * d:])
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), -1) @ v
            h = model.fusion_norms[0](h + 0.1 * attn.out_proj(a))
    dec_in = torch.cat([torch.full_like(labels[:, :1], model.config.decoder_start_token_id), labels[:, :-1]], 1)
    dec = model.model.decoder(input_ids=dec_in, encoder_hidden_states=h, encoder_attention_mask=mask).last_hidden_state
    logits = model.lm_head(dec) + model.final_logits_bias
    loss_caption = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))  # plain mean, every position
    # InfoNCE: music raw, mean over all frames; text mean over every position (pads too), projected to d_m
    _, first = np.unique(batch['song_ids'].numpy(), return_index=True)   # duplicate songs dropped
    z_m = F.normalize(h_m.mean(1)[first], dim=-1)
    z_t = F.normalize(model.contrast.proj_t(h_t.mean(1))[first], dim=-1)
    s = z_m @ z_t.T / 0.3
    pos = s.diagonal()
    neg = torch.where(torch.eye(len(s), dtype=torch.bool), torch.zeros_like(s), s.exp()).sum(1)
    loss_contrast = (-pos + torch.log(pos.exp() + neg)).mean()          # NT-Xent, music anchors
    return loss_caption + 0.02 * loss_contrast, loss_caption, loss_contrast


def test_original_recipe_is_the_authors_training_step():
    c = config(recipe='original')
    assert (c.fusion_shared, c.optimizer, c.caption_loss, c.text_pool, c.proj_dim) == (True, 'adafactor-hf', 'positions', 'positions', 0)
    model = model_for(c).train()
    assert len(model.fusion) == 1 and isinstance(model.contrast.proj_m, torch.nn.Identity)
    ref = copy.deepcopy(model)
    batch = fixed_batch()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    got = step(c, model, batch)
    want, want_cap, want_con = original_loss(ref, batch, c)
    assert got['loss'] == pytest.approx(want.item(), rel=1e-5)
    assert got['loss_cap'] == pytest.approx(want_cap.item(), rel=1e-5)
    assert got['loss_contrast'] == pytest.approx(want_con.item(), rel=1e-5)
    assert got['alpha_eff'] == pytest.approx(0.02)       # the caption loss counts every position: alpha as given
    # one step of the authors' optimiser, built by hand as trainer.py builds it
    opt = Adafactor(ref.parameters(), lr=c.lr, warmup_init=False, relative_step=False, weight_decay=0.0)
    want.backward(); opt.step()
    ref_params = dict(ref.named_parameters())
    d = model.config.d_model
    for name, p in model.named_parameters():
        ours, theirs = p.detach() - before[name], ref_params[name].detach() - before[name]
        # a key bias has no gradient (softmax ignores a shift shared by all keys): its float noise, which Adafactor
        # normalises to a full-sized step of random sign, is left out
        if name.endswith('k_proj.bias'): continue
        if name.endswith('attn.in_proj_bias'): ours, theirs = ours[torch.arange(3 * d) // d != 1], theirs[torch.arange(3 * d) // d != 1]
        assert theirs.abs().max() > 0, name
        assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max(), name


def test_original_recipe_differs_from_ours_in_each_part():
    "Each of the original's choices changes the loss or the step: the test above could not pass by accident."
    batch = fixed_batch()
    base = step(config(recipe='original'), model_for(config(recipe='original')).train(), batch)
    for k, v in dict(caption_loss='tokens', text_pool='tokens').items():
        c = config(recipe='original', **{k: v})
        assert step(c, model_for(c).train(), batch)['loss'] != pytest.approx(base['loss'], rel=1e-4), k


@pytest.mark.parametrize('choice', sorted(k for k in RECIPES['original'] if RECIPES['original'][k] != RECIPES['ours'].get(k)))
def test_each_choice_overrides_the_recipe(choice):
    for recipe, other in (('original', 'ours'), ('ours', 'original')):
        value = RECIPES[other].get(choice, TrainConfig().resolve().__getattribute__(choice))
        c = config(recipe=recipe, **{choice: value})
        assert getattr(c, choice) == value
        assert all(getattr(c, k) == v for k, v in RECIPES[recipe].items() if k != choice)


def test_overrides_reach_the_model_and_optimiser():
    c = config(recipe='original', fusion_shared=False, optimizer='adamw', proj_dim=8)
    m = model_for(c)
    assert len(m.fusion) == 2 and m.contrast.proj_m.out_features == 8
    assert isinstance(build_optimizer(c, m, 10)[0], torch.optim.AdamW)
    c = config(fusion_shared=True, optimizer='adafactor-hf')
    m = model_for(c)
    opt = build_optimizer(c, m, 10)[0]
    assert len(m.fusion) == 1 and isinstance(opt, SyncFreeAdafactor) and opt.defaults['scale_parameter']
    assert not build_optimizer(config(optimizer='adafactor'), m, 10)[0].defaults['scale_parameter']


def test_ours_is_unchanged():
    "Under 'ours' the loss parts are the model's own (real-token means) as before; only alpha's scale is new."
    batch = fixed_batch()
    for alpha_scale in ('none', 'positions'):
        c = config(alpha_scale=alpha_scale)
        model = model_for(c).train()
        assert len(model.fusion) == 2 and isinstance(model.contrast.proj_m, torch.nn.Linear)
        ref = copy.deepcopy(model)
        got = step(c, model, batch)
        n_tok = batch['labels'].ne(-100).sum()
        before = ref(**batch, num_items_in_batch=n_tok)   # what the trainer's step logged and trained before recipes
        assert got['loss_cap'] == pytest.approx(before.loss_cap.item(), rel=1e-6)
        assert got['loss_contrast'] == pytest.approx(before.loss_contrast.item(), rel=1e-6)
        if alpha_scale == 'none': assert got['loss'] == pytest.approx(before.loss.item(), rel=1e-6)
        else:
            factor = len(batch['labels']) * c.max_target_len / n_tok.item()
            assert got['alpha_eff'] == pytest.approx(0.02 * factor)
            assert got['loss'] == pytest.approx(before.loss_cap.item() + 0.02 * factor * before.loss_contrast.item(), rel=1e-6)


def _rng_worker(rank, world, path, store):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    m = torch.nn.Linear(2, 2); o = torch.optim.SGD(m.parameters(), lr=0.1); s = torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0)
    torch.manual_seed(100 + rank)                     # each process its own stream, as dropout makes them
    save_checkpoint(path, m, o, s, dict(step=1), Dist(rank, world))
    dist.barrier()                                    # rank 0 has written it
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_checkpoint(path, m, o, s)
    got = torch.rand(3)
    dist.destroy_process_group()
    if not torch.equal(got, expected): raise SystemExit(f'rank {rank}: RNG not restored')


def test_resume_restores_every_process_rng(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_rng_worker, args=(2, str(tmp_path/'last.pt'), str(tmp_path/'store')), nprocs=2, join=True)
    ck = torch.load(tmp_path/'last.pt', weights_only=True)
    assert len(ck['rng_ranks']) == 2 and not torch.equal(ck['rng_ranks'][0]['torch'], ck['rng_ranks'][1]['torch'])


def test_workers_start_once_the_data_is_made(tmp_path, monkeypatch):
    "With several workers, the data and its features are made first, here and once per folder, not in each worker."
    import concurrent.futures
    import alcap.recipes as R
    events = []
    monkeypatch.setattr(R, 'load_dataset_songs', lambda c: events.append(('songs', c.data_dir)) or [])
    monkeypatch.setattr(R, 'ensure_features', lambda c, songs: events.append(('features', c.features_dir)))

    class Inline:
        "The process pool, run here: it records when each run would start."
        def __init__(self, *args, **kwargs): pass
        def __enter__(self): return self
        def __exit__(self, *exc): return False

        def submit(self, fn, c, *args):
            events.append(('train', c.output_dir))
            done = concurrent.futures.Future()
            done.set_result(c.output_dir)
            return done

    monkeypatch.setattr(R, 'ProcessPoolExecutor', Inline)
    plan = {('ours', s): TrainConfig(dataset='demo', data_dir=str(tmp_path/'demo'), method='alcap', seed=s,
                                     output_dir=str(tmp_path/f'run{s}')).resolve() for s in (0, 1, 2)}
    R.train_plan(plan, 'alcap-recipes ...', workers=2, log=lambda *_: None)
    assert [e[0] for e in events] == ['songs', 'features', 'train', 'train', 'train']
    assert events[0][1] == str(tmp_path/'demo')


def test_the_default_demo_must_be_there(tmp_path, monkeypatch):
    "Without data/demo the ablation stops with one line saying how to make the 800 songs, not on a quick demo."
    import alcap.recipes as R
    monkeypatch.setattr(R, 'repo_root', lambda: tmp_path)
    with pytest.raises(ValueError, match=r"data/demo: no demo there yet.*alcap-demo --stages data features"):
        R.recipe_ablation(tmp_path/'runs', seeds=(0,), arms=['tf32'])
    assert not (tmp_path/'data').exists() and not (tmp_path/'runs').exists()
