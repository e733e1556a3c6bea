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
    assert 'fastcore<2' in reqs  # alcap.music patches FeatureCache, MusiCNN and CNNSA with fastcore's @patch
    assert d['tst_flags'].split() == ['slow', 'gpu'] and d['allowed_cell_metadata_keys'] == 'tags'
    scripts = dict(l.strip().split('=', 1) for l in d['console_scripts'].strip().splitlines())
    import importlib
    for name, target in scripts.items():
        mod, fn = target.split(':')
        if importlib.util.find_spec(mod) is not None:  # modules of issues not landed yet are checked when they land
            assert callable(getattr(importlib.import_module(mod), fn)), name


def module_notebooks() -> dict:
    "Each generated module of `alcap/` and the notebook it is exported from."
    out = {}
    for p in sorted((ROOT/'alcap').glob('*.py')):
        m = re.search(r'File to edit: \.\./nbs/(\S+)\.ipynb', p.read_text())
        if m: out[p.stem] = m.group(1)
    return out


def alcap_imports(path: Path):
    "(module imported, line number, at top level?) for every import of an alcap module in `path`."
    import ast
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: names = [node.module.split('.')[0]]
            elif node.level == 1: names = [a.name for a in node.names]
            elif (node.module or '').startswith('alcap'):
                names = [node.module.split('.')[1]] if '.' in node.module else [a.name for a in node.names]
            else: continue
        elif isinstance(node, ast.Import):
            names = [a.name.split('.')[1] for a in node.names if a.name.startswith('alcap.')]
        else: continue
        for n in names: yield n, node.lineno, id(node) in top


def test_imports_form_a_dag_in_notebook_order():
    "A module imports only modules of notebooks that sort before its own: the package reads bottom-up."
    nbs = module_notebooks()
    assert {'core', 'data', 'music', 'demodata', 'losses', 'model', 'train', 'demo'} <= set(nbs)
    upward = [f'alcap/{m}.py:{line} imports alcap.{dep} ({nbs[dep]} does not sort before {nb})'
              for m, nb in nbs.items() for dep, line, _ in alcap_imports(ROOT/'alcap'/f'{m}.py')
              if dep in nbs and dep != m and nbs[dep] >= nb]
    assert not upward, '\n'.join(upward)


def test_upward_import_is_caught(tmp_path):
    "The check above sees imports inside functions too, relative and absolute."
    p = tmp_path/'x.py'
    p.write_text('from .data import Song\ndef f():\n    from alcap.demo import main\n    import alcap.train\n')
    assert [(n, top) for n, _, top in alcap_imports(p)] == [('data', True), ('demo', False), ('train', False)]


def test_imports_inside_functions_say_why():
    "Imports sit at the top of a module; one inside a function carries a comment (an optional or heavy dependency)."
    import ast
    bare = []
    for p in sorted((ROOT/'alcap').glob('*.py')):
        if p.stem == '_modidx': continue
        lines = p.read_text().splitlines()
        tree = ast.parse('\n'.join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                k = node.lineno - 1
                while lines[k - 1].strip().startswith(('import ', 'from ')): k -= 1  # a block under one comment
                if '#' not in lines[node.lineno - 1] and not lines[k - 1].strip().startswith('#'):
                    bare.append(f'{p.name}:{node.lineno}: {lines[node.lineno - 1].strip()}')
    assert not bare, '\n'.join(bare)


DENSE_LINES_PENDING = set()


def dense_lines(path: Path) -> list[str]:
    "Lines over 120 characters and statements joined by `;` in `path`, read as Python tokens (not text in strings)."
    import ast, io, tokenize
    src = path.read_text()
    # nbdev writes `__all__` wrapped at 120 characters after its `__all__ = `: generated, not ours to wrap
    generated = set()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in node.targets):
            generated |= set(range(node.lineno, node.end_lineno + 1))
    out = [f'{path.name}:{i}: {len(l)} characters' for i, l in enumerate(src.splitlines(), 1)
           if len(l) > 120 and i not in generated]
    out += [f'{path.name}:{t.start[0]}: statements joined by ;'
            for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.OP and t.string == ';']
    return out


def test_no_dense_lines():
    "The generated modules keep lines under 120 characters and one statement per line."
    paths = [p for p in sorted((ROOT/'alcap').glob('*.py')) if p.stem != '_modidx' and p.stem not in DENSE_LINES_PENDING]
    dense = [d for p in paths for d in dense_lines(p)]
    assert not dense, '\n'.join(dense)


def test_dense_lines_are_caught(tmp_path):
    "The check sees long lines and `;` between statements, but not a `;` or a long text inside a string."
    p = tmp_path/'x.py'
    p.write_text("a = 1; b = 2\ns = 'x; y'\nif a: c = 3; d = 4\nt = '" + 'z' * 130 + "'\n")
    assert [d.split(': ', 1)[1] for d in dense_lines(p)] == ['136 characters', 'statements joined by ;',
                                                              'statements joined by ;']
