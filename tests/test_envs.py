"""Per-rule conda environments: every rule has one, and it declares what the rule's code imports.

Conda channels cannot be reached here, so the environments are checked statically: for every rule, its
script and every brainvae function and module it reaches (transitively, function-local imports included;
read with ``ast``) may import only the standard library, brainvae, and packages its ``envs/*.yaml``
declares. The environments' pins must be the tested versions of ``requirements/lock.txt``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from test_workflow import REPO

RULES_DIR = REPO / "workflow" / "rules"
ENVS_DIR = REPO / "envs"
SRC = REPO / "src"
LOCK_FILES = (REPO / "requirements" / "lock.txt", REPO / "requirements" / "torch.txt")
# Conda packages of every environment that are not Python libraries (not in the pip lock).
CONDA_BASE = {"python", "pip"}
# Import name -> distribution name, where they differ (the installed metadata covers the rest).
IMPORT_TO_DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "SimpleITK": "simpleitk",
    "ants": "antspyx",
    "PIL": "pillow",
    "cc3d": "connected-components-3d",
    "dateutil": "python-dateutil",
}


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- rules ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    rule_file: Path
    directives: dict[str, str]  # directive -> its string value (conda, script, shell, ...)

    def path(self, directive: str) -> Path | None:
        """A file directive (conda, script) resolved as Snakemake does: relative to the rule file."""
        value = self.directives.get(directive)
        return (self.rule_file.parent / value).resolve() if value else None


RULE_START = re.compile(r"^(?P<indent>\s*)(?:rule|checkpoint)\s+(?P<name>\w+)\s*:")
DIRECTIVE = re.compile(r"^\s+(?P<key>conda|script|shell|run|wrapper|notebook|container)\s*:\s*(?P<rest>.*)$")


def parse_rules(path: Path) -> list[Rule]:
    """Rules of one .smk file with their string-valued directives (a non-literal value is an error)."""
    lines = path.read_text().splitlines()
    rules = []
    i = 0
    while i < len(lines):
        start = RULE_START.match(lines[i])
        if not start:
            i += 1
            continue
        indent = len(start["indent"])
        body_end = i + 1
        while body_end < len(lines) and (not lines[body_end].strip()
                                         or len(lines[body_end]) - len(lines[body_end].lstrip()) > indent):
            body_end += 1
        directives = {}
        for j in range(i + 1, body_end):
            match = DIRECTIVE.match(lines[j])
            if not match:
                continue
            value = match["rest"].strip()
            if not value:  # the value is on the next non-empty line
                value = next(line.strip() for line in lines[j + 1:body_end] if line.strip())
            if match["key"] == "run":
                directives["run"] = value
                continue
            try:
                directives[match["key"]] = ast.literal_eval(value.rstrip(","))
            except (ValueError, SyntaxError):
                raise AssertionError(f"{path.name}: rule {start['name']}: {match['key']}: must be a string literal "
                                     f"so tools can read it without running the workflow, got {value!r}") from None
        rules.append(Rule(start["name"], path, directives))
        i = body_end
    return rules


@cache
def workflow_rules() -> tuple[Rule, ...]:
    rules = [r for path in sorted(RULES_DIR.glob("*.smk")) for r in parse_rules(path)]
    rules += parse_rules(REPO / "Snakefile")
    return tuple(rules)


def job_rules() -> list[Rule]:
    """Rules that run code (every rule but target-only ones such as `all`)."""
    return [r for r in workflow_rules() if {"script", "shell", "run", "wrapper", "notebook"} & set(r.directives)]


# --- environments and the lock -------------------------------------------------------------------------


@dataclass
class Env:
    path: Path
    pins: dict[str, str | None] = field(default_factory=dict)  # normalised name -> exact version or None
    python: str | None = None  # conda spec of python, e.g. "3.11"


def conda_spec(spec: str) -> tuple[str, str | None]:
    """Conda match spec ``[channel::]name[=|==]version`` -> (name, exact version or None)."""
    spec = spec.split("::")[-1].strip()
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:==?\s*([^\s=<>!~*,|]+))?(.*)", spec)
    if not match:
        raise AssertionError(f"cannot read conda spec {spec!r}")
    exact = match[2] if not match[3].strip() else None
    return match[1], exact


def pip_spec(spec: str) -> tuple[str, str | None] | None:
    """pip requirement ``name==version`` -> (name, version); options such as -e or -r -> None."""
    spec = spec.split("#")[0].strip()
    if not spec or spec.startswith("-"):
        return None
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(?:==\s*([^\s;,]+))?(.*)", spec)
    if not match:
        raise AssertionError(f"cannot read pip requirement {spec!r}")
    return match[1], (match[2] if not match[3].strip() else None)


@cache
def read_env(path: Path) -> Env:
    document = yaml.safe_load(path.read_text())
    env = Env(path)
    for entry in document.get("dependencies", []):
        if isinstance(entry, dict):
            for requirement in entry.get("pip", []):
                parsed = pip_spec(requirement)
                if parsed:
                    env.pins[normalise(parsed[0])] = parsed[1]
            continue
        name, version = conda_spec(str(entry))
        if name == "python":
            env.python = version or ""
        env.pins[normalise(name)] = version
    return env


@cache
def locked_versions() -> dict[str, str]:
    versions = {}
    for path in LOCK_FILES:
        for line in path.read_text().splitlines():
            parsed = pip_spec(line)
            if parsed and parsed[1]:
                versions[normalise(parsed[0])] = parsed[1]
    return versions


def env_files() -> list[Path]:
    return sorted(ENVS_DIR.glob("*.yaml"))


# --- what code imports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThirdPartyImport:
    package: str  # top-level import name, e.g. "sklearn"
    module: str  # the brainvae module (or the script) that imports it
    line: int


@dataclass
class Module:
    """One Python file: its top-level functions and classes, and what its names are bound to."""

    name: str  # dotted module name, or the script's path for a rule script
    path: Path
    tree: ast.Module
    symbols: dict[str, ast.AST]
    # name -> ("module", dotted) or ("symbol", dotted module, attribute), from its module-level imports
    bindings: dict[str, tuple[str, ...]]
    lazy: dict[str, str]  # PEP 562 packages: public name -> submodule (a literal _SOURCES dict)


def module_file(dotted: str) -> Path | None:
    base = SRC.joinpath(*dotted.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def absolute_module(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """Target of ``from X import ...`` in module ``current``, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = current.split(".")
    package = parts if is_package else parts[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def walk(nodes: list[ast.AST]):
    """Every node under ``nodes`` (like ast.walk), skipping ``if TYPE_CHECKING:`` blocks, which never run."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if is_type_checking_block(node):
            stack += node.orelse
            continue
        yield node
        stack += ast.iter_child_nodes(node)


def brainvae_imports(nodes: list[ast.AST], current: str, is_package: bool
                     ) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The brainvae imports among ``nodes``: the names they bind, and the modules they import."""
    bindings: dict[str, tuple[str, ...]] = {}
    imported: set[str] = set()
    for node in walk(nodes):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "brainvae":
                    imported.add(alias.name)
                    bound = alias.asname or alias.name.split(".")[0]
                    bindings[bound] = ("module", alias.name if alias.asname else bound)
        elif isinstance(node, ast.ImportFrom):
            target = absolute_module(node, current, is_package)
            if target.split(".")[0] != "brainvae":
                continue
            imported.add(target)
            for alias in node.names:
                bound = alias.asname or alias.name
                if module_file(f"{target}.{alias.name}"):
                    imported.add(f"{target}.{alias.name}")
                    bindings[bound] = ("module", f"{target}.{alias.name}")
                else:
                    bindings[bound] = ("symbol", target, alias.name)
    return bindings, imported


@cache
def load_module(dotted: str) -> Module:
    path = module_file(dotted)
    assert path is not None, f"no module {dotted} under {SRC}"
    return parse_module(dotted, path, is_package=path.name == "__init__.py")


def parse_module(name: str, path: Path, is_package: bool) -> Module:
    tree = ast.parse(path.read_text(), filename=str(path))
    symbols = {n.name: n for n in tree.body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    top_imports = [n for n in tree.body if not is_type_checking_block(n)
                   and not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    lazy = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_SOURCES"
                                                for t in node.targets):
            lazy = {key: f"{name}.{value}" for key, value in ast.literal_eval(node.value).items()}
    return Module(name, path, tree, symbols, brainvae_imports(top_imports, name, is_package)[0], lazy)


def module_level_code(module: Module) -> list[ast.AST]:
    """What runs when the module is imported: everything but function and method bodies."""
    code: list[ast.AST] = []
    for node in module.tree.body:
        if is_type_checking_block(node):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            code += [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]
        elif isinstance(node, ast.ClassDef):
            code += [*node.decorator_list, *node.bases, *node.keywords]
            code += [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        else:
            code.append(node)
    return [n for n in code if n is not None]


Node = tuple[str, str | None]  # (module, None): importing the module; (module, name): running that function/class


class ImportGraph:
    """Which third-party packages a piece of code reaches, through brainvae functions and modules."""

    def __init__(self) -> None:
        self.via: dict[Node, Node | None] = {}  # how each node was reached (for error messages)

    def reach(self, script: Path) -> tuple[list[ThirdPartyImport], dict[Node, Node | None]]:
        entry = parse_module(str(script.relative_to(REPO)), script, is_package=False)
        self.via = {(entry.name, None): None}
        found: list[ThirdPartyImport] = []
        queue: list[tuple[Module, Node, list[ast.AST]]] = [(entry, (entry.name, None), list(entry.tree.body))]
        while queue:
            module, node, code = queue.pop()
            found += self.third_party(module, code)
            for target in self.edges(module, node, code):
                if target not in self.via:
                    self.via[target] = node
                    target_module = load_module(target[0])
                    if target[1] is None:
                        queue.append((target_module, target, module_level_code(target_module)))
                    else:
                        queue.append((target_module, target, [target_module.symbols[target[1]]]))
        return found, self.via

    def third_party(self, module: Module, code: list[ast.AST]) -> list[ThirdPartyImport]:
        found = []
        for node in walk(code):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                top_level = name.split(".")[0]
                if top_level != "brainvae" and top_level not in sys.stdlib_module_names:
                    found.append(ThirdPartyImport(top_level, module.name, node.lineno))
        return found

    def edges(self, module: Module, node: Node, code: list[ast.AST]) -> set[Node]:
        """brainvae modules imported by ``code`` and the brainvae functions/classes it refers to."""
        edges: set[Node] = set()
        is_package = module.path.name == "__init__.py"
        # Importing a submodule runs its parent packages' __init__ first.
        parts = module.name.split(".")
        if parts[0] == "brainvae":
            edges |= {(".".join(parts[:i]), None) for i in range(1, len(parts))}
        local, imported = brainvae_imports(code, module.name, is_package)
        edges |= {(name, None) for name in imported}
        bindings = {**module.bindings, **local}
        for sub in walk(code):
            if isinstance(sub, ast.Name):
                if sub.id in module.symbols and (module.name, sub.id) != node:
                    edges.add((module.name, sub.id))
                elif sub.id in bindings:
                    edges |= self.resolve(bindings[sub.id])
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                binding = bindings.get(sub.value.id)
                if binding and binding[0] == "module":
                    edges |= self.resolve(("symbol", binding[1], sub.attr))
        return edges

    def resolve(self, binding: tuple[str, ...], depth: int = 0) -> set[Node]:
        """Where an imported name is defined: a module, or a function/class of one (re-exports followed)."""
        if binding[0] == "module":
            return {(binding[1], None)}
        _, dotted, name = binding
        if depth > 10 or module_file(dotted) is None:
            return set()
        target = load_module(dotted)
        if module_file(f"{dotted}.{name}"):
            return {(f"{dotted}.{name}", None)}
        if name in target.symbols:
            return {(dotted, None), (dotted, name)}
        if name in target.bindings:
            return {(dotted, None)} | self.resolve(target.bindings[name], depth + 1)
        if name in target.lazy:
            return {(dotted, None)} | self.resolve(("symbol", target.lazy[name], name), depth + 1)
        return {(dotted, None)}  # a constant: importing the module is all it takes


def chain(via: dict[Node, Node | None], module: str) -> str:
    """'script -> brainvae.x.f -> brainvae.y' for an error message."""
    node: Node | None = next((n for n in via if n[0] == module and n[1] is None), None)
    node = node or next((n for n in via if n[0] == module), None)
    steps = []
    while node is not None:
        steps.append(node[0] + (f".{node[1]}" if node[1] else ""))
        node = via[node]
    return " -> ".join(reversed(steps))


@cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(import_name: str) -> set[str]:
    """Distribution names that provide an import name (normalised)."""
    names = {IMPORT_TO_DISTRIBUTION.get(import_name, import_name)}
    names |= set(installed_distributions().get(import_name, []))
    return {normalise(n) for n in names}


# --- tests ---------------------------------------------------------------------------------------------


def test_rule_parser_finds_every_rule_of_the_workflow(tmp_path):
    """The .smk parser sees exactly the rules Snakemake sees (so no rule escapes the env checks), over both
    preprocessing job layouts (preprocess.one_job_per_scan defines other rules) and with a template-space dataset
    (datasets[].space defines preprocess_template_scan)."""
    listed = set()
    for one_job_per_scan in (False, True):
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config["preprocess"]["one_job_per_scan"] = one_job_per_scan
        # (The demo's HCP-like and SantPau-like datasets are in template space: preprocess_template_scan is defined.)
        assert any(d.get("space", "native") != "native" for d in config["datasets"])
        configfile = tmp_path / f"config_{one_job_per_scan}.yaml"
        configfile.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
             str(tmp_path), "--configfile", str(configfile), "--list-rules"],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        rules = {line.strip() for line in result.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}
        assert ("preprocess_scan" in rules) == one_job_per_scan and ("n4" in rules) != one_job_per_scan
        listed |= rules
    assert listed == {r.name for r in workflow_rules()}


def test_every_rule_runs_in_a_conda_env_of_envs():
    problems = []
    for rule in job_rules():
        env = rule.path("conda")
        if env is None:
            problems.append(f"rule {rule.name} ({rule.rule_file.name}): no conda: directive")
        elif env.parent != ENVS_DIR or not env.is_file():
            problems.append(f"rule {rule.name}: conda: {rule.directives['conda']} is not a file in envs/")
        if "script" in rule.directives and not rule.path("script").is_file():
            problems.append(f"rule {rule.name}: script {rule.directives['script']} does not exist")
    assert job_rules(), "no rules found"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("env_path", env_files(), ids=lambda p: p.name)
def test_env_pins_are_the_locked_versions(env_path):
    env = read_env(env_path)
    locked = locked_versions()
    problems = []
    for name, version in env.pins.items():
        if name in CONDA_BASE:
            continue
        if name not in locked:
            problems.append(f"{name}: not in requirements/lock.txt (add it to requirements/direct.txt, "
                            f"run `make lock`)")
        elif version is None:
            problems.append(f"{name}: not pinned (the lock has {name}=={locked[name]})")
        elif version != locked[name]:
            problems.append(f"{name}=={version}: the lock has {name}=={locked[name]}")
    requires_python = SpecifierSet(re.search(r'requires-python\s*=\s*"([^"]+)"',
                                             (REPO / "pyproject.toml").read_text())[1])
    if not env.python or not requires_python.contains(env.python + ".0" if env.python.count(".") == 1
                                                       else env.python):
        problems.append(f"python={env.python}: pyproject.toml requires {requires_python}")
    assert not problems, f"{env_path.relative_to(REPO)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("rule", [r for r in job_rules() if "script" in r.directives and "conda" in r.directives],
                         ids=lambda r: r.name)
def test_rule_code_imports_only_what_its_env_declares(rule):
    env = read_env(rule.path("conda"))
    imports, via = ImportGraph().reach(rule.path("script"))
    missing = {}
    for found in imports:
        if not distributions(found.package) & set(env.pins):
            missing.setdefault((found.module, found.package), found)
    messages = [
        f"rule {rule.name}: {module} imports {package!r} (line {found.line}; distribution "
        f"{' or '.join(sorted(distributions(package)))}), which {rule.directives['conda']} does not declare "
        f"[reached via {chain(via, module)}]"
        for (module, package), found in sorted(missing.items())
    ]
    assert not messages, "\n".join(messages)


def test_import_check_follows_functions_and_local_imports(tmp_path, monkeypatch):
    """The checker itself: a package imported inside a function two modules away is found, with its path;
    one imported by a function the script never reaches is not."""
    package = tmp_path / "src" / "brainvae"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "helpers.py").write_text(
        "import json\n\ndef used():\n    import sklearn.decomposition\n    return _inner()\n\n"
        "def _inner():\n    from skimage import filters\n\ndef unused():\n    import torch\n")
    (package / "entry.py").write_text("from .sub.helpers import used as run\n\n"
                                      "def step():\n    return run()\n\nCONSTANT = 1\n")
    script = tmp_path / "workflow" / "scripts" / "rule_script.py"
    script.parent.mkdir(parents=True)
    script.write_text("import numpy as np\n\nwith open('x') as f:\n    from brainvae.entry import step\n"
                      "    step()\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "src")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    load_module.cache_clear()
    try:
        imports, via = ImportGraph().reach(script)
    finally:
        load_module.cache_clear()
    packages = {(i.module, i.package) for i in imports}
    assert packages == {("workflow/scripts/rule_script.py", "numpy"), ("brainvae.sub.helpers", "sklearn"),
                        ("brainvae.sub.helpers", "skimage")}
    assert chain(via, "brainvae.sub.helpers").startswith("workflow/scripts/rule_script.py -> brainvae.entry")
    assert distributions("sklearn") >= {"scikit-learn"} and distributions("ants") >= {"antspyx"}


@pytest.mark.parametrize("profile", sorted((REPO / "workflow" / "profiles").glob("*/config.yaml")),
                         ids=lambda p: p.parent.name)
def test_profiles_let_conda_jobs_import_brainvae_from_the_checkout(profile):
    """The envs do not install brainvae (common.smk puts src/ on PYTHONPATH); Snakemake strips PYTHONPATH in
    conda envs unless told not to."""
    assert not any(requirement.startswith("-e") for env in env_files() for entry in
                   yaml.safe_load(env.read_text())["dependencies"] if isinstance(entry, dict)
                   for requirement in entry.get("pip", []))
    settings = yaml.safe_load(profile.read_text())
    assert settings.get("conda-not-block-search-path-envvars") is True, (
        f"{profile.relative_to(REPO)}: add `conda-not-block-search-path-envvars: true`")


@pytest.mark.parametrize("one_job_per_scan", [False, True], ids=["per_step", "one_job_per_scan"])
def test_lint_is_clean(tmp_path, one_job_per_scan):
    """Both preprocessing job layouts (preprocess.one_job_per_scan defines other rules)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["preprocess"]["one_job_per_scan"] = one_job_per_scan
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(configfile), "--lint"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"snakemake --lint:\n{result.stdout}\n{result.stderr}"
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr
