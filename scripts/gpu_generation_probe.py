# Where ours' generation time goes on a GPU, batch by batch and op by op (random-init bart-base sized ALCAP,
# SI-shaped test songs, beam 4). Run from the repository root on the GPU machine, as scripts/gpu_bench.sh sets up:
#   python3 scripts/gpu_generation_probe.py OUT_DIR full 140
# (OUT_DIR, size, seconds after which the optional rows are skipped). Writes gen_probe.json and gen_profile.txt.
# results/gpu_probe/ holds its output at commit 3d08d96, before generation left cuDNN's attention out.
import dataclasses, json, sys, time
T0 = time.perf_counter()
import torch
from torch.profiler import ProfilerActivity, profile
from alcap.benchmarks import SIZES, _si_data, regime_collator, regime_config, si_model
from alcap.train import generate_captions

out, size, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
p = SIZES[size]
tok, ds = _si_data({}, p, 0)
torch.manual_seed(0)
model = si_model(size, tok, p['d_m']).to(dev)
c = regime_config('ours', size)
col = regime_collator('ours', c, tok)
test = ds['test']
B, N = (128 if dev.type == 'cuda' else 8), p['max_new_tokens']
order = sorted(range(len(test)), key=lambda i: -len(test.input_ids[i]))   # as generate_captions batches them
chunks = [order[k:k + B] for k in range(0, len(order), B)]
res = dict(device=str(dev), B=B, N=N, chunks=len(chunks), rows=[])


def sync():
    if dev.type == 'cuda': torch.cuda.synchronize()


def gen(idx, n):
    "Seconds and new tokens to caption `idx` in one batch, every caption exactly `n` tokens."
    model.generation_config.min_new_tokens = n
    cc = dataclasses.replace(c, max_new_tokens=n)
    sync()
    t, st = time.perf_counter(), {}
    generate_captions(model, test, tok, col, cc, dev, indices=idx, batch_size=len(idx), stats=st)
    sync()
    return time.perf_counter() - t, st['new_tokens']


def row(name, dt, toks, n):
    r = dict(name=name, s=round(dt, 3), tokens=toks, ms_per_step=round(1000 * dt / n, 2), tok_per_s=round(toks / dt))
    print(f'[{time.perf_counter() - T0:6.1f}] {r}', flush=True)
    res['rows'].append(r)
    with open(f'{out}/gen_probe.json', 'w') as f: json.dump(res, f, indent=1)


dt, k = gen(chunks[0][:8], 4)
row('warm-up 8 songs, 4 tokens', dt, k, 4)
for j in (len(chunks) // 2, 0, len(chunks) - 1):   # a middle batch first, then the longest songs, then the last
    if time.perf_counter() - T0 > limit * 0.45: break
    dt, k = gen(chunks[j], N)
    row(f'chunk {j} of {len(chunks)}, {len(chunks[j])} songs, {N} tokens', dt, k, N)
for bs in (32, 512 if dev.type == 'cuda' else 16):
    if time.perf_counter() - T0 > limit * 0.55: break
    n = max(4, N // 4)
    dt, k = gen(order[:bs], n)
    row(f'{bs} songs, {n} tokens', dt, k, n)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
n = max(4, N // 8)
with profile(activities=acts) as prof:
    dt, k = gen(chunks[len(chunks) // 2], n)
row(f'profiled chunk, {n} tokens', dt, k, n)
ka = prof.key_averages()
key = 'self_cuda_time_total' if dev.type == 'cuda' else 'self_cpu_time_total'
with open(f'{out}/gen_profile.txt', 'w') as f:
    f.write(ka.table(sort_by=key, row_limit=30, max_name_column_width=90) + '\n')
    f.write(ka.table(sort_by='cpu_time_total', row_limit=30, max_name_column_width=90) + '\n')
    if dev.type == 'cuda':
        f.write(f'wall {dt:.3f} s, summed self device time {sum(e.self_device_time_total for e in ka) / 1e6:.3f} s\n')
print(f'done in {time.perf_counter() - T0:.1f} s')
