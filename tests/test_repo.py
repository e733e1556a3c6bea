"The repository's own contracts: README commands, CI script, pins."
import configparser, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    block = re.search(r'```bash\n(.*?)```', (ROOT/'README.md').read_text(), re.S).group(1)
    return [l.split('#')[0].strip() for l in block.strip().splitlines()]


def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'readme'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    setup_cmd, test_cmd = readme_commands()
    assert setup_cmd.startswith('bash .ci/setup') and 'alcap-demo' in setup_cmd
    assert 'nbdev_test' in test_cmd and 'pytest' in test_cmd
    ci = (ROOT/'.ci'/'run').read_text()
    assert 'bash .ci/setup' in ci and test_cmd in ci


def test_settings_pins():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    d = cfg['DEFAULT']
    assert {'nbdev==2.4.14', 'execnb<0.2', 'fastcore<2'} <= set(d['dev_requirements'].split())
    reqs = d['requirements'].split()
    assert 'torch==2.11.*' in reqs and 'torchaudio==2.11.*' in reqs
    assert d['tst_flags'].split() == ['slow', 'gpu'] and d['allowed_cell_metadata_keys'] == 'tags'
    scripts = dict(l.strip().split('=', 1) for l in d['console_scripts'].strip().splitlines())
    import importlib
    for name, target in scripts.items():
        mod, fn = target.split(':')
        if importlib.util.find_spec(mod) is not None:  # modules of issues not landed yet are checked when they land
            assert callable(getattr(importlib.import_module(mod), fn)), name
