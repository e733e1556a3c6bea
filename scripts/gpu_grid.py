"GPU session: the demo grid (methods x seeds), the alpha sweep and shuffled pairs, several trainings at once."
import json, os, subprocess, sys, tarfile, threading, time
from pathlib import Path
T0 = time.time()
DEADLINE = float(os.environ.get('GRID_DEADLINE_S', '500'))
OUT = Path(os.environ['OUT'])
def main():
    import torch, transformers
    print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), flush=True)
    from alcap.core import hardware
    from alcap.demodata import ensure_demo_data, ensure_features
    from alcap.runs import run_grid
    ROOT = Path('/tmp/alcap')
    data = ROOT/'demo'
    songs = ensure_demo_data(data, n=800, seed=0)
    print(f'data {time.time() - T0:.0f} s', flush=True)
    ensure_features(songs, data/'features'/'musicnn-msd')
    print(f'features {time.time() - T0:.0f} s', flush=True)
    common = dict(dataset='demo', data_dir=str(data), demo_n=800)
    runs = {}
    METHODS = json.loads(os.environ.get('GRID_METHODS', '{"bart": [0.0, {}], "bart-fusion": [0.0, {}], "alcap": [0.02, {}], '
                                        '"alcap-original": [0.02, {"method": "alcap", "recipe": "original"}]}'))
    for seed in (0, 1, 2):
        for name, (alpha, extra) in METHODS.items():
            out = ROOT/'runs'/'demo'/f'{name}_s{seed}'
            runs[out] = dict(common, method=extra.get('method', name), alpha=alpha, seed=seed, output_dir=str(out),
                             **{k: v for k, v in extra.items() if k != 'method'})
    if os.environ.get('GRID_SHUFFLED', '1') == '1':
        for seed in (0, 1, 2):
            out = ROOT/'runs'/'shuffled'/f'alcap-shuffled_s{seed}'
            runs[out] = dict(common, method='alcap', alpha=0.02, seed=seed, pairing='shuffled', output_dir=str(out))
    try:
        from alcap.ablation import sweep_runs
        plan = sweep_runs(ROOT/'runs'/'ablation', (0, 0.002, 0.02, 0.2, 2, 20), (0, 1, 2), 'demo', str(data), demo_n=800)
        for (alpha, seed), (params, cfg) in plan.items(): runs[Path(cfg.output_dir)] = params
    except Exception as e: print('no ablation plan:', e, flush=True)
    print(len(runs), 'runs', flush=True)

    def pack():
        with tarfile.open(OUT/'runs.tgz', 'w:gz') as tar:
            for d in sorted((ROOT/'runs').glob('*/*')):
                for f in d.iterdir():
                    if f.is_file() and f.suffix in ('.csv', '.json', '.ipynb'): tar.add(f, arcname=str(f.relative_to(ROOT)))
        print(f'packed at {time.time() - T0:.0f} s', flush=True)

    def watchdog():
        time.sleep(max(1, DEADLINE - (time.time() - T0)))
        print('deadline: packing what is finished', flush=True)
        pack()
        os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()
    fails = run_grid(runs, data, workers=int(os.environ.get('GRID_WORKERS', '12')))
    print('failures', json.dumps(fails, indent=1), flush=True)
    print(f'grid done {time.time() - T0:.0f} s', flush=True)
    att = [str(p) for p in sorted((ROOT/'runs'/'demo').glob('*_s*')) if p.name.split('_s')[0] in ('bart-fusion', 'alcap')]
    if att and time.time() - T0 < DEADLINE - 60:
        r = subprocess.run([sys.executable, '-c', 'import sys; from alcap.attention import attention_cli; sys.exit(attention_cli())',
                            '--runs', *att, '--out', str(OUT/'attention'), '--note',
                            f'demo 800 songs (seed 0), random-init tiny BART, frozen pretrained MSD musicnn; {hardware()}'],
                           capture_output=True, text=True)
        print('attention rc', r.returncode, r.stdout[-2000:], r.stderr[-2000:], flush=True)
    pack()
    os._exit(0)

if __name__ == '__main__':
    main()
