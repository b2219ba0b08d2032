"""The README and every docs/ page stay true to the code: every `file.py:function` they cite exists and, where a
table row cites `Eq. (n)`, carries that marker; every relative link and #anchor resolves (also the docs links in code
comments); no page points outside the repository; the README stays a landing page (under 200 lines, a link to every
page, the study's headline between its markers, the full tables in docs/study.md). Also the study's and the learning
curves' plotting on small synthetic input."""
import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["refuel.md", "baselines_dpo_rebel.md", "mtpo.md", "iterative_ppo.md"]
REF = re.compile(r"`([\w./-]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`")
EQ = re.compile(r"Eq\. \((\d+)\)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_files():
    """Every page a reader may open: the README and docs/*.md."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def prose(text: str) -> str:
    """The page without its fenced code blocks (their '#' lines are comments, not headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens, underscores kept), spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def find_def(path: Path, name: str):
    """The ast node of a top-level function or class `name`, or of method `Class.method`."""
    tree = ast.parse(path.read_text())
    parts = name.split(".")
    scope = tree.body
    node = None
    for part in parts:
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    return node


def table_rows(text: str):
    for line in prose(text).splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            yield line


def test_every_algorithm_has_a_page():
    for page in PAGES:
        assert (DOCS / page).exists(), f"docs/{page} is missing"
        text = (DOCS / page).read_text()
        assert "## Equations and lines to code" in text, f"docs/{page} has no equations-to-code table"
        assert len(REF.findall(text)) >= 5, f"docs/{page} maps fewer than 5 equations or lines to code"


def test_cited_functions_exist_and_carry_their_eq_markers():
    problems = []
    for doc in doc_files():
        text = doc.read_text()
        for file, func in set(REF.findall(text)):
            path = ROOT / file
            if not path.exists():
                problems.append(f"{name(doc)}: `{file}:{func}`: no file {file}")
            elif find_def(path, func) is None:
                problems.append(f"{name(doc)}: `{file}:{func}`: {file} defines no {func}")
        for row in table_rows(text):
            cells = [c.strip() for c in row.strip("|").split("|")]
            eqs = EQ.findall(cells[0]) if cells else []
            for file, func in REF.findall(row):
                path = ROOT / file
                node = find_def(path, func) if path.exists() else None
                if node is None:
                    continue  # reported above
                source = ast.get_source_segment(path.read_text(), node) or ""
                for n in eqs:
                    if f"Eq. ({n})" not in source:
                        problems.append(f"{name(doc)}: the row citing Eq. ({n}) maps it to `{file}:{func}`, "
                                        f"whose source has no 'Eq. ({n})' marker")
    assert not problems, "\n".join(problems)


def test_every_row_of_the_equations_table_maps_to_code():
    for page in PAGES:
        text = (DOCS / page).read_text()
        section = text.split("## Equations and lines to code", 1)[1].split("\n## ", 1)[0]
        rows = list(table_rows(section))[1:]  # the header row first
        assert rows, f"docs/{page}: empty equations table"
        for row in rows:
            assert REF.search(row), f"docs/{page}: a table row maps to no `file.py:function`: {row}"


def check_link(source: Path, target: str) -> str:
    """'' when `target` (a relative link from file `source`) resolves, else what is wrong."""
    if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
        return ""
    path, _, anchor = target.partition("#")
    dest = (source.parent / path).resolve() if path else source
    if not dest.exists():
        return f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading with anchor #{anchor} in {dest.name}"
    return ""


def test_relative_links_and_anchors_resolve():
    problems = []
    for doc in doc_files():
        for target in LINK.findall(prose(doc.read_text())):
            why = check_link(doc, target)
            if why:
                problems.append(f"{name(doc)}: {why}")
    assert not problems, "\n".join(problems)


def test_docs_links_in_code_resolve():
    """Comments that cite a docs page (docs/mtpo.md#kl-without-double-counting) point at a heading that exists."""
    problems = []
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), ROOT / "README.md"]):
        for page, anchor in re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", path.read_text()):
            why = check_link(ROOT / "x", f"docs/{page}" + (f"#{anchor}" if anchor else ""))
            if why:
                problems.append(f"{path.name}: {why}")
    assert not problems, "\n".join(problems)


def test_docs_point_nowhere_outside_the_repository():
    for doc in doc_files():
        text = doc.read_text()
        for bad in ("../shared", "shared/papers", "REFERENCE.md", "notes A."):
            assert bad not in text, f"{name(doc)} mentions {bad!r}"


def test_simulator_names_in_docs_exist():
    sim = pytest.importorskip("simulator")
    missing = sorted({(doc.name, attr) for doc in doc_files()
                      for attr in re.findall(r"\bsim\.([A-Za-z_]\w*)", doc.read_text()) if not hasattr(sim, attr)})
    assert not missing, f"docs cite sim.<name> that simulator does not have: {missing}"


def test_the_readme_is_a_landing_page():
    """Under 200 lines, linking every docs page; the study's headline table between the README's markers and the
    full tables between docs/study.md's (where benchmarks/study.py --update_readme writes them)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200, f"README.md has {len(readme.splitlines())} lines: move sections to docs/"
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(prose(readme))
              if target.startswith("docs/")}
    unlinked = sorted(p.name for p in DOCS.glob("*.md") if p.name not in linked)
    assert not unlinked, f"README.md links no docs/ page named {unlinked}"
    a, b = "<!-- study:begin -->", "<!-- study:end -->"
    for path in (ROOT / "README.md", DOCS / "study.md"):
        text = path.read_text()
        assert text.count(a) == 1 and text.count(b) == 1 and text.index(a) < text.index(b), f"{path.name}: markers"
    headline = readme.split(a)[1].split(b)[0]
    full = (DOCS / "study.md").read_text().split(a)[1].split(b)[0]
    assert "| method | avg win rate" in headline and "h=1" not in headline, "README: not the headline table"
    assert "| method | h=1" in full and "Preference matrix" in full, "docs/study.md: not the full tables"


def test_study_writes_the_readme_headline_and_the_full_tables(tmp_path, monkeypatch):
    """--update_readme's path: the full text into docs/study.md (figure path made relative to docs/), the headline
    table into README.md, each between its markers, the rest of both pages untouched."""
    study = bench("study")
    (tmp_path / "docs").mkdir()
    a, b = "<!-- study:begin -->", "<!-- study:end -->"
    (tmp_path / "README.md").write_text(f"# R\n\nbefore\n{a}\nold\n{b}\nafter\n")
    (tmp_path / "docs" / "study.md").write_text(f"# S\n{a}\nold\n{b}\ntail\n")
    monkeypatch.setattr(study, "ROOT", tmp_path)
    table = synthetic_table(["REFUEL", "MTPO"])
    for row in table.values():
        row.update(average=0.6, average_sd=0.01, reward_sd=0.02, kl=3.0, minutes=1.5, seeds=[1, 2, 3])
    table["MTPO"]["seeds"] = [1, 2, 3, 4, 5]
    args = study.Args(seeds=[1, 2, 3], iterations=50)
    headline = study.headline_table(table, args, dict(reference_reward=0.278, v_star=0.805))
    assert headline.count("\n| REFUEL |") == 1 and "| MTPO |" in headline and "h=1" not in headline
    assert "| 1.5 | 1,2,3 |" in headline and "| 1.5 | 1,2,3,4,5 |" in headline  # each row's seeds
    assert "[docs/study.md](docs/study.md)" in headline
    full = "| method | h=1 |\n\n![win rate against mu per turn](benchmarks/study_win_rate.png)"
    study.update_docs(full, headline)
    readme, page = (tmp_path / "README.md").read_text(), (tmp_path / "docs" / "study.md").read_text()
    assert readme == f"# R\n\nbefore\n{a}\n{headline}\n{b}\nafter\n"
    assert page == f"# S\n{a}\n" + full.replace("](benchmarks/", "](../benchmarks/") + f"\n{b}\ntail\n"


def test_study_more_seeds_are_added_for_their_method_only():
    study = bench("study")
    args = study.Args(seeds=[1, 2, 3], more_seeds=["Iterative PPO=4,5", "MTPO=3,6"])
    assert study.seeds_of(args, "Iterative PPO") == [1, 2, 3, 4, 5]
    assert study.seeds_of(args, "MTPO") == [1, 2, 3, 6]  # a seed already in --seeds is not run twice
    assert study.seeds_of(args, "REFUEL") == [1, 2, 3]
    for bad in (["Nope=4"], ["Iterative PPO"]):
        with pytest.raises(SystemExit, match="--more_seeds"):
            study.seeds_of(study.Args(more_seeds=bad), "REFUEL")


# ------------------------------------------------------------------------------------------------------------------
# The study's figure and the learning curves, on small synthetic input
# ------------------------------------------------------------------------------------------------------------------
def bench(name: str):
    """A script of benchmarks/ as a module (loaded from its path, once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def synthetic_table(methods, H=5, seeds=3, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    table = {}
    for m in methods:
        per_seed = np.clip(0.5 + rng.normal(0, 0.05, (seeds, H)), 0, 1)
        rewards = rng.uniform(0.3, 0.7, seeds)
        table[m] = dict(per_turn=per_seed.mean(0).tolist(), per_turn_seeds=per_seed.tolist(),
                        reward=float(rewards.mean()), reward_seeds=rewards.tolist())
    return table


def test_study_styles_are_one_per_method():
    study = bench("study")
    styles = study.method_styles(list(study.METHODS) + ["a new method", "another"])
    assert len({(c, mk) for c, mk, _ in styles.values()}) == len(styles), "two methods share colour and marker"
    assert len({c for c, _, _ in styles.values()}) == len(styles), "two methods share a colour"
    assert styles["REBEL-LT-ONLINE"][2] == "--" and styles["REFUEL"][2] == "-"
    assert study.method_styles(["multi-turn_RLHF"])["multi-turn_RLHF"][:2] == study.STYLE["multi-turn RLHF"]


def test_study_plot_on_synthetic_input(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    study = bench("study")

    table = synthetic_table(list(study.METHODS))
    levels = {"mu": 0.278, "V*": 0.805, "never-ask": 0.3914}
    fig = study.plot_figure(table, 5, levels)
    win, reward = fig.axes[:2]
    assert list(win.get_xticks()) == [1, 2, 3, 4, 5], "turn ticks must be the integer turns"
    labels = win.get_legend_handles_labels()[1]
    assert all(m in labels for m in study.METHODS) and any("mu" in label for label in labels)
    assert len(win.containers) == len(study.METHODS)  # one errorbar container per method
    assert all(c.has_yerr for c in win.containers), "no spread over seeds drawn"
    assert {f"{k} {v:.3f}" for k, v in levels.items()} <= set(reward.get_legend_handles_labels()[1])
    out = tmp_path / "study.png"
    assert study.plot(table, 5, out, levels) and out.stat().st_size > 10_000


def test_learning_curves_on_synthetic_runs(tmp_path):
    plot_curves = bench("plot_curves")

    assert plot_curves.method_of(Path("runs/study/REFUEL__seed2")) == "REFUEL"
    assert plot_curves.method_of(Path("runs/x/refuel__tutor__1__1733000000")) == "refuel__tutor"
    assert plot_curves.method_of(Path("runs/seeds/seed3__1733000000")) == "seeds"
    for method, top in (("REFUEL", 0.7), ("MTPO", 0.68)):
        for seed in (1, 2, 3):
            d = tmp_path / f"{method}__seed{seed}"
            d.mkdir()
            rows = []
            for it in range(0, 31, 10):
                r = 0.28 + (top - 0.28) * it / 30 + 0.01 * seed
                rows += [{"step": it, "eval/mean_reward": r, "eval/fraction_of_v_star": r / 0.805,
                          "charts/elapsed_min": it / 10}, {"step": it + 1, "losses/refuel_loss": 0.1}]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = plot_curves.group_runs(sorted(tmp_path.iterdir()))
    assert {m: len(r) for m, r in groups.items()} == {"MTPO": 3, "REFUEL": 3}
    levels = plot_curves.reference_levels([rows for runs in groups.values() for _, rows in runs])
    assert levels["V*"] == pytest.approx(0.805) and levels["mu (step 0)"] == pytest.approx(0.30)
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    plot_curves.main(plot_curves.parse_args([*map(str, sorted(tmp_path.glob("*__seed*"))), "--output", str(out)]))
    assert out.stat().st_size > 10_000
