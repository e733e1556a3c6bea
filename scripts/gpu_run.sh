set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH ALCAP_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
(cd .gpu/cache && tar xzf nltk_data.tgz)
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1
nproc; nvidia-smi --query-gpu=name,memory.used --format=csv
python3 .gpu/grid.py 2>&1 | tee $OUT/log.txt
