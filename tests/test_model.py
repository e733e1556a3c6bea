"Tests for alcap.model on tiny random-init configs (no downloads)."
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from transformers import AutoModel, BartForConditionalGeneration
from alcap.model import AlcapConfig, AlcapForConditionalGeneration, FusionCrossAttention, tiny_bart_config, bart_base_config, METHODS

D_M = 24

def make(method='alcap', seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(fusion_layers=[1], d_music=D_M, contrast_proj_dim=8)
    if method == 'alcap': kw.setdefault('alpha', 0.5)
    return AlcapForConditionalGeneration.from_bart_config(tiny_bart_config(99, d_model=32, heads=4, ffn=64), method, **{**opts, **kw}).eval()

def make_batch(B=4, L=10, T=7, l_m=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens, mlens = [L, L - 3, L - 1, L - 5][:B], [l_m, l_m - 4, l_m, l_m - 6][:B]
    ids = torch.randint(3, 99, (B, L), generator=g); ids[:, 0] = 0
    am = torch.tensor([[1] * n + [0] * (L - n) for n in lens])
    ids = ids.masked_fill(am == 0, 1); ids[torch.arange(B), torch.tensor(lens) - 1] = 2
    labels = torch.randint(3, 99, (B, T), generator=g); labels[1, -2:] = -100
    mam = torch.tensor([[1] * n + [0] * (l_m - n) for n in mlens])
    h_m = torch.randn(B, l_m, D_M, generator=g)
    return dict(input_ids=ids, attention_mask=am, labels=labels, music_features=h_m, music_attention_mask=mam,
                song_ids=torch.arange(B))

def test_forward_outputs_and_total_loss():
    m, b = make('alcap'), make_batch()
    out = m(**b, output_fusion_attentions=True)
    assert out.logits.shape == (4, 7, 99)
    cap = F.cross_entropy(out.logits.reshape(-1, 99), b['labels'].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss_cap, cap)
    torch.testing.assert_close(out.loss, out.loss_cap + 0.5 * out.loss_contrast)
    (w,) = out.fusion_attentions
    assert w.shape == (4, 10, 13)
    assert w[1, :, 9:].abs().max() == 0 and w[3, :, 7:].abs().max() == 0          # music padding masked
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 10))
    assert m(**b).fusion_attentions is None

def test_three_methods():
    b = make_batch()
    bart, fusion, alcap = (make(x) for x in METHODS)
    assert bart.fusion is None and bart.contrast is None and fusion.contrast is None and alcap.contrast is not None
    assert bart(**b).loss_contrast is None and fusion(**b).loss_contrast is None and alcap(**b).loss_contrast is not None
    torch.testing.assert_close(fusion(**b).loss, fusion(**b).loss_cap)
    with pytest.raises(ValueError, match='needs music_features'): fusion(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels'])

def test_music_disabled_equals_plain_bart():
    m, b = make('bart'), make_batch()
    ref = BartForConditionalGeneration(tiny_bart_config(99, d_model=32, heads=4, ffn=64)).eval()
    ref.load_state_dict(m.state_dict())
    want = ref(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels'])
    got = m(**b)                                         # the music in the batch is ignored
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=0)

def test_music_changes_the_output():
    m, b = make('bart-fusion', fusion_scale=1.0), make_batch()
    b2 = dict(b, music_features=torch.randn_like(b['music_features']))
    assert (m(**b).logits - m(**b2).logits).abs().max() > 1e-4

def pad_more(b, extra_text=4, extra_music=5, extra_labels=3):
    "The same batch with more padding, garbage in padded music frames."
    B = len(b['input_ids'])
    return dict(b, input_ids=F.pad(b['input_ids'], (0, extra_text), value=1), attention_mask=F.pad(b['attention_mask'], (0, extra_text)),
                labels=F.pad(b['labels'], (0, extra_labels), value=-100),
                music_features=torch.cat([b['music_features'], 50 * torch.randn(B, extra_music, D_M)], 1),
                music_attention_mask=F.pad(b['music_attention_mask'], (0, extra_music)))

@pytest.mark.parametrize('method', METHODS)
def test_padding_does_not_change_real_positions(method):
    m, b = make(method), make_batch()
    out, out2 = m(**b), m(**pad_more(b))
    torch.testing.assert_close(out2.logits[:, :7], out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2.loss, out.loss, atol=1e-5, rtol=1e-5)
    enc, enc2 = (m.encode(x['input_ids'], x['attention_mask'], x['music_features'], x['music_attention_mask']) for x in (b, pad_more(b)))
    torch.testing.assert_close(enc2.last_hidden_state[:, :10], enc.last_hidden_state, atol=1e-5, rtol=1e-5)
    # a song's result does not depend on the other songs' padding either: item 0 alone == item 0 in the batch
    one = {k: v[:1] for k, v in b.items()}
    torch.testing.assert_close(m(**one).logits[0], out.logits[0], atol=1e-5, rtol=1e-5)

def test_gradients_reach_fusion_and_projections_not_the_frozen_music_encoder():
    m, b = make('alcap'), make_batch()
    m.train()
    frozen = nn.Sequential(nn.Linear(8, D_M), nn.GELU()).requires_grad_(False)   # stand-in for the frozen music encoder
    b['music_features'] = frozen(torch.randn(4, 13, 8))
    m(**b).loss.backward()
    named = dict(m.named_parameters())
    for n in [k for k in named if k.startswith(('fusion', 'contrast'))]:
        assert named[n].grad is not None and named[n].grad.abs().sum() > 0, n
    assert any(k.startswith('contrast.proj_m') for k in named) and any(k.startswith('contrast.proj_t') for k in named)
    assert all(p.grad is None for p in frozen.parameters())
    assert not b['music_features'].requires_grad

def test_config_choices_and_errors():
    base = tiny_bart_config(99, d_model=32, heads=4, ffn=64)
    with pytest.raises(ValueError, match="out of range for a 2-layer encoder.*after_encoder"): AlcapConfig.for_method('alcap', base)
    with pytest.raises(ValueError, match="'bart-fusion'"): AlcapConfig.for_method('alcap', base, alpha=0.0, fusion_layers=[1])
    with pytest.raises(ValueError, match="use method='alcap'"): AlcapConfig.for_method('bart-fusion', base, alpha=0.1, fusion_layers=[1])
    with pytest.raises(ValueError, match='method must be one of'): AlcapConfig.for_method('gpt', base)
    cfg = AlcapConfig.for_method('alcap', bart_base_config())
    assert (cfg.fusion_positions(), cfg.text_layer(), cfg.alpha, cfg.fusion_scale, cfg.contrast_tau) == ([4, 5], 3, 0.02, 0.1, 0.3)
    assert AlcapConfig.for_method('bart-fusion', base, fusion_layers='after_encoder').fusion_positions() == [1]
    assert AlcapConfig.for_method('bart-fusion', bart_base_config(), fusion_layers=[-2, -1]).fusion_positions() == [4, 5]

def test_after_encoder_is_fusion_after_last_layer_and_norm_sharing():
    b = make_batch()
    a, c = make('bart-fusion', fusion_layers='after_encoder'), make('bart-fusion', fusion_layers=[-1])
    torch.testing.assert_close(a(**b).logits, c(**b).logits)
    shared = make('bart-fusion', fusion_layers=[0, 1])
    own = make('bart-fusion', fusion_layers=[0, 1], fusion_share_norm=False)
    assert len(shared.fusion_norms) == 1 and len(own.fusion_norms) == 2 and len(own.fusion) == 2

def test_fully_padded_music_row_gets_no_update():
    fuse = FusionCrossAttention(16, D_M)
    h_t, h_m = torch.randn(2, 5, 16), torch.randn(2, 7, D_M)
    mask = torch.ones(2, 7, dtype=torch.long); mask[1] = 0
    out, w = fuse(h_t, h_m, mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and w[1].abs().max() == 0

def gen_kwargs(b, **kw):
    return dict(input_ids=b['input_ids'], attention_mask=b['attention_mask'], music_features=b['music_features'],
                music_attention_mask=b['music_attention_mask'], max_length=12, **kw)

def test_batched_beam_search_is_deterministic_and_uses_music():
    m, b = make('alcap', fusion_scale=1.0), make_batch()
    out = m.generate(**gen_kwargs(b, num_beams=4), output_scores=True, return_dict_in_generate=True)
    again = m.generate(**gen_kwargs(b, num_beams=4), output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 4
    assert torch.equal(out.sequences, again.sequences) and torch.equal(out.sequences_scores, again.sequences_scores)
    # batching does not change an item's beam search result
    for i in range(4):
        one = {k: v[i:i + 1] for k, v in b.items()}
        single = m.generate(**gen_kwargs(one, num_beams=4), output_scores=True, return_dict_in_generate=True)
        n = single.sequences.shape[1]
        assert torch.equal(single.sequences[0], out.sequences[i, :n])
        torch.testing.assert_close(single.sequences_scores[0], out.sequences_scores[i], atol=1e-4, rtol=1e-4)
    other = m.generate(**gen_kwargs(dict(b, music_features=3 * torch.randn_like(b['music_features'])), num_beams=4),
                       output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(other.sequences_scores, out.sequences_scores)

def test_decoder_cache_is_returned_and_used():
    "The key/value cache goes in and out under the installed transformers' name (`cache`; `past_key_values` before)."
    from alcap.model import CACHE_NAME
    m, b = make('alcap', fusion_scale=1.0), make_batch()
    dec = torch.randint(3, 99, (4, 6), generator=torch.Generator().manual_seed(1))
    enc = m.encode(b['input_ids'], b['attention_mask'], b['music_features'], b['music_attention_mask'])
    common = dict(attention_mask=b['attention_mask'], encoder_outputs=enc)
    full = m(decoder_input_ids=dec, **common).logits
    for name in ('cache', 'past_key_values'):          # generate() passes the one its version knows
        first = m(decoder_input_ids=dec[:, :5], use_cache=True, **common)
        cache = getattr(first, CACHE_NAME)
        assert cache is not None and cache.get_seq_length() == 5
        step = m(decoder_input_ids=dec[:, 5:], use_cache=True, **common, **{name: cache})
        torch.testing.assert_close(step.logits[:, 0], full[:, 5], atol=1e-5, rtol=1e-5)
    cached = m.generate(**gen_kwargs(b, num_beams=4), use_cache=True)
    assert torch.equal(cached, m.generate(**gen_kwargs(b, num_beams=4), use_cache=False))

def test_beam_sampling_option_is_seeded():
    m, b = make('alcap'), make_batch()
    torch.manual_seed(3); s1 = m.generate(**gen_kwargs(b, num_beams=4, do_sample=True, top_p=0.92))
    torch.manual_seed(3); s2 = m.generate(**gen_kwargs(b, num_beams=4, do_sample=True, top_p=0.92))
    assert torch.equal(s1, s2) and s1.shape[0] == 4

def test_save_load_round_trip(tmp_path):
    m, b = make('alcap', contrast_symmetric=True), make_batch()
    m.save_pretrained(tmp_path)
    assert (tmp_path / 'model.safetensors').exists() and '"model_type": "alcap"' in (tmp_path / 'config.json').read_text()
    for cls in (AlcapForConditionalGeneration, AutoModel):
        m2 = cls.from_pretrained(tmp_path).eval()
        assert type(m2) is AlcapForConditionalGeneration
        assert (m2.config.method, m2.config.alpha, m2.config.text_init, m2.config.fusion_layers, m2.config.contrast_symmetric) == ('alcap', 0.5, 'random', [1], True)
        o, o2 = m(**b), m2(**b)
        assert torch.equal(o.logits, o2.logits) and torch.equal(o.loss, o2.loss)
        assert m2.lm_head.weight.data_ptr() == m2.model.shared.weight.data_ptr()   # tied after loading

def test_from_bart_local_folder_and_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)   # read at import time, so patch the constant
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(tiny_bart_config(99, d_model=32, heads=4, ffn=64)).eval()
    bart.save_pretrained(tmp_path / 'bart')
    m = AlcapForConditionalGeneration.from_bart(str(tmp_path / 'bart'), 'alcap', fusion_layers=[1], d_music=D_M).eval()
    assert m.config.text_init == f"pretrained:{tmp_path / 'bart'}"
    for k, v in bart.state_dict().items(): assert torch.equal(m.state_dict()[k], v), k
    for unreachable in (str(tmp_path / 'missing'), 'facebook/bart-base'):      # never a silent random init
        with pytest.raises(OSError, match='from_bart_config'): AlcapForConditionalGeneration.from_bart(unreachable)

def test_from_bart_keeps_the_checkpoints_generation_config(tmp_path):
    "A fresh model from the config would generate with transformers' defaults, not the checkpoint's settings."
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(tiny_bart_config(99, d_model=32, heads=4, ffn=64)).eval()
    bart.generation_config.update(no_repeat_ngram_size=2, num_beams=3, early_stopping=True, length_penalty=2.0,
                                  forced_bos_token_id=0)
    bart.save_pretrained(tmp_path / 'bart')
    assert (tmp_path / 'bart' / 'generation_config.json').exists()
    m = AlcapForConditionalGeneration.from_bart(str(tmp_path / 'bart'), 'bart-fusion', fusion_layers=[1], d_music=D_M).eval()
    gc = m.generation_config
    assert (gc.no_repeat_ngram_size, gc.num_beams, gc.early_stopping, gc.length_penalty, gc.forced_bos_token_id) == (2, 3, True, 2.0, 0)
    m.save_pretrained(tmp_path / 'captioner')                                   # and it stays with the saved captioner
    again = AutoModel.from_pretrained(tmp_path / 'captioner')
    assert (again.generation_config.no_repeat_ngram_size, again.generation_config.num_beams) == (2, 3)
    # in force when generating: with no_repeat_ngram_size 2 no bigram repeats within a caption
    b = make_batch()
    seqs = m.generate(**{**gen_kwargs(b), "max_length": 30})
    for s in seqs.tolist():
        s = [t for t in s if t not in (0, 1, 2)]
        bigrams = list(zip(s, s[1:]))
        assert len(bigrams) == len(set(bigrams))


@pytest.mark.gpu
def test_gpu_padded_lm_head_is_the_plain_head():
    "On a GPU the LM head's matmul pads |V| (99 here) to 128: the loss, the logits and every gradient stay the CPU's."
    assert torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, b = make('alcap'), make_batch()
    gpu = make('alcap').cuda()
    gb = {k: v.cuda() for k, v in b.items()}
    assert -gpu.config.vocab_size % gpu.vocab_multiple   # the padded path is the one taken
    h = torch.randn(6, 32, device='cuda')
    torch.testing.assert_close(gpu.lm_logits(h), gpu.lm_logits(h, multiple=1), atol=1e-5, rtol=1e-5)
    outs = []
    for m, batch in ((cpu, b), (gpu, gb)):   # eval(): no dropout draw, so both devices compute the same function
        m.zero_grad()
        out = m(**batch)
        out.loss.backward()
        outs.append((out, {k: p.grad.cpu() for k, p in m.named_parameters() if p.grad is not None}))
    (oc, gc), (og, gg) = outs
    torch.testing.assert_close(og.logits.cpu(), oc.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(og.loss.cpu(), oc.loss, atol=1e-5, rtol=1e-5)
    assert gg.keys() == gc.keys()
    for k in gc: torch.testing.assert_close(gg[k], gc[k], atol=1e-4, rtol=1e-3, msg=k)
