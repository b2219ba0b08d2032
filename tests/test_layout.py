"""The repository's shape, read from its imports: six files at the top (the four algorithm scripts, simulator.py and
evaluate.py) plus Iterative PPO's companion single_turn_ppo.py; envs/ and plumbing/ below them; imports that run one
way (scripts -> envs -> simulator -> plumbing) with no circle; and the files a copy of each script needs.

    python tests/test_layout.py    # print the measured facts: root files, circles, upward imports, what a copy needs
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("refuel.py", "mtpo.py", "iterative_ppo.py", "baselines_dpo_rebel.py")
TOP = (*SCRIPTS, "simulator.py", "evaluate.py", "single_turn_ppo.py")
# the layer of each file: an import may only go to a lower layer (or within plumbing / within envs)
LAYER = {"scripts": 3, "envs": 2, "simulator": 1, "plumbing": 0}


def modules() -> dict:
    """module name -> path, for the repository's own code (the top level, envs/, plumbing/)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("envs", "plumbing"):
        for p in (ROOT / pkg).glob("*.py"):
            found[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return found


def imports_of(path: Path, known: dict, lazy: bool = True) -> set:
    """The repository modules a file imports, at the top or (lazy=True) inside functions too (a lazy import is
    still a dependency: it counts for circles and layers)."""
    out = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if lazy else tree.body):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def layer(module: str) -> int:
    if module.split(".")[0] in ("envs", "plumbing"):
        return LAYER[module.split(".")[0]]
    return LAYER["simulator"] if module == "simulator" else LAYER["scripts"]


def graph(lazy: bool = True) -> dict:
    known = modules()
    return {m: imports_of(p, known, lazy) - {m} for m, p in known.items()}


def circles(g: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def upward(g: dict) -> list:
    """Imports from a lower layer to a higher one (a package's __init__ importing its own modules is not one)."""
    return sorted((a, b) for a, deps in g.items() for b in deps
                  if layer(b) > layer(a) and not (a in ("envs", "plumbing") and b.startswith(a + ".")))


def copy_of(script: str, g: dict) -> list:
    """The repository files a copy of the script needs: what it imports, transitively. With graph(lazy=False):
    what it needs with your own environment (the tutor task and the chat world are imported only when --env or
    --model_name_or_path names them)."""
    seen, todo = set(), [Path(script).stem]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += list(g.get(m, ()))
        if "." in m:
            todo.append(m.split(".")[0])  # a package's __init__.py comes along
    known = modules()
    return sorted(str(known[m].relative_to(ROOT)) for m in seen)


def test_the_top_level_is_the_scripts_simulator_and_evaluate():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(TOP)


def test_imports_run_one_way_without_a_circle():
    g = graph()
    assert circles(g) == []
    assert upward(g) == []


def test_simulator_defines_what_the_scripts_read_from_it():
    """No module __getattr__ forwarding names: every sim.X a script reads is defined (or imported by name) in
    simulator.py, so grep and go-to-definition find it."""
    tree = ast.parse((ROOT / "simulator.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, ast.Assign):
            top |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            top |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            top |= {(a.asname or a.name).split(".")[0] for a in node.names}
    assert "__getattr__" not in top
    for script in (*TOP, *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "envs").glob("*.py"))):
        read = {n.attr for n in ast.walk(ast.parse((ROOT / script).read_text()))
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "sim"}
        assert read <= top, f"{script} reads sim.{sorted(read - top)}, not defined in simulator.py"


def test_no_script_names_the_tutor_task():
    """The scripts and evaluate.py read V* through Environment.optimal_value(): they work with any environment."""
    for script in (*SCRIPTS, "evaluate.py", "single_turn_ppo.py"):
        text = (ROOT / script).read_text()
        for name in ("TutorEnv", "tutor_value", "tutor_task", "TutorRules"):
            assert name not in text, f"{script} names {name}"


def test_a_copy_with_your_own_environment_leaves_the_tutor_and_chat_behind():
    for script in (*SCRIPTS, "evaluate.py"):
        files = copy_of(script, graph(lazy=False))
        allowed = ("envs/__init__.py", "envs/flags.py", "envs/loading.py", "envs/learned_reward.py" * (script == "mtpo.py"))
        assert not [f for f in files if f.startswith("envs/") and f not in allowed], files


def lines(files) -> int:
    return sum(len((ROOT / f).read_text().splitlines()) for f in files)


def main() -> None:
    g = graph()
    print(f"root .py files: {len(list(ROOT.glob('*.py')))} ({', '.join(sorted(p.name for p in ROOT.glob('*.py')))})")
    print(f"import circles: {circles(g) or 'none'}")
    print(f"upward imports: {upward(g) or 'none'}")
    for script in SCRIPTS + ("evaluate.py",):
        every, own = copy_of(script, g), copy_of(script, graph(lazy=False))
        print(f"a copy of {script}: {len(own)} files, {lines(own)} lines with your own environment "
              f"({', '.join(own)}); {len(every)} files, {lines(every)} lines with the tutor and chat worlds")


if __name__ == "__main__":
    sys.exit(main())
