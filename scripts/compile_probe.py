"""How many graphs, and how many seconds, torch.compile spends on the training step over batches of changing lengths,
with the lengths marked dynamic from the first batch (as `train_step` does) and without (dynamo's automatic dynamic).

    python scripts/compile_probe.py --out results/compile_probe [--backend inductor]

Each arm runs in a fresh process with inductor's caches off and a fresh cache folder: the tiny SI-shaped captioner
of `08_benchmarks` (random init), 16 batches of 4 songs from `si_shaped_songs(64, seed=0)`, AdamW, on the CPU."""
import argparse, dataclasses, json, os, subprocess, sys, tempfile, time
from pathlib import Path


def arm(mark: bool, backend: str) -> dict:
    import numpy as np, torch
    from torch._dynamo.utils import counters
    import alcap.train as T
    from alcap.benchmarks import (SIZES, _batch_shape, regime_collator, regime_config, si_model, si_shaped_songs,
                                  si_tokenizer)
    from alcap.data import SongDataset
    if not mark: T.mark_lengths_dynamic = lambda *a: None   # dynamo's own rule: constants until a dimension changes
    torch.manual_seed(0)
    p = SIZES['tiny']
    songs = si_shaped_songs(64, seed=0, scale=p['scale'])
    tok = si_tokenizer(songs, vocab_size=500)
    ds = SongDataset(songs, tok, {s.id: np.zeros((p['l_m'], p['d_m']), np.float16) for s in songs}, 64, 64)
    c = dataclasses.replace(regime_config('ours', 'tiny'), lm_head='auto')
    model = si_model('tiny', tok, p['d_m'])
    opt, sched = T.build_optimizer(c, model, 100)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=regime_collator('ours', c, tok), shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    fwd, steps, t0 = torch.compile(model, backend=backend), [], time.perf_counter()
    for b in loader:
        t = time.perf_counter()
        T.train_step(fwd, model, b, opt, sched, c, torch.device('cpu'))
        steps.append(dict(lengths=list(_batch_shape(b)),
                          seconds=round(time.perf_counter() - t, 2), graphs=counters['stats']['unique_graphs']))
    return dict(marked=mark, backend=backend, seconds=round(time.perf_counter() - t0, 1),
                graphs=counters['stats']['unique_graphs'], steps=steps)


def main():
    a = argparse.ArgumentParser()
    a.add_argument('--out', required=True)
    a.add_argument('--backend', default='inductor')
    a.add_argument('--arm', choices=('marked', 'unmarked'))
    args = a.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm == 'marked', args.backend)))
        return
    import torch
    from alcap.core import hardware
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out/'.write_check').touch()
        (out/'.write_check').unlink()
    except OSError as e:   # before minutes of compiling, not after
        sys.exit(f'compile_probe: --out {args.out}: cannot write there ({e.strerror})')
    arms = []
    for name in ('unmarked', 'marked'):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE='0',
                       TORCHINDUCTOR_AUTOGRAD_CACHE='0')
            r = subprocess.run([sys.executable, __file__, '--out', args.out, '--backend', args.backend, '--arm', name],
                               env=env, capture_output=True, text=True, check=True)
            arms.append(json.loads(r.stdout.strip().splitlines()[-1]))
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    R = dict(command=f'python scripts/compile_probe.py --out {args.out} --backend {args.backend}', commit=commit,
             date=time.strftime('%Y-%m-%d'), torch=torch.__version__, hardware=hardware(),
             threads=torch.get_num_threads(), model='tiny SI-shaped captioner, random init', arms=arms)
    tmp = out/'compile_probe.json.tmp'
    tmp.write_text(json.dumps(R, indent=1))
    tmp.replace(out/'compile_probe.json')
    for r in arms: print(f"{'marked' if r['marked'] else 'unmarked'}: {r['graphs']} graph(s), {r['seconds']} s")


if __name__ == '__main__':
    main()
