"""The package's layering: imports only go downwards, no cycles, no private
names across modules, and the observer registry is complete on import."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "amct_hf"

# lower layers first; a module may import its own layer (same package) or a lower one
LAYERS = [
    {"errors"},
    {"algorithms", "fileio", "naming", "settings"},
    {"record", "observers", "distributed"},
    {"op", "modeling", "data"},
    {"calibrate", "evaluation", "export"},
    {"cli"},
]
# what the pure layers may not import at all, whatever the layer order says
FORBIDDEN = {
    "algorithms": {"transformers", "datasets", "accelerate", "torch.distributed", "amct_hf.record.files",
                   "amct_hf.fileio", "amct_hf.distributed"},
    "observers": {"transformers", "datasets", "accelerate", "amct_hf.record.files", "amct_hf.fileio"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name, path):
    """(imported module, imported names) for every import in the file, function-level too."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod, [a.name for a in node.names]


def _layer(module):
    top = module.split(".")[1] if module.count(".") else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    return None


def test_imports_only_go_downwards_and_name_no_private_symbol():
    problems = []
    for name, path in _modules():
        if name == "amct_hf":
            continue  # the package root re-exports lazily
        own = _layer(name)
        top = name.split(".")[1]
        for mod, names in _imports(name, path):
            for banned in FORBIDDEN.get(top, ()):
                if mod == banned or mod.startswith(banned + "."):
                    problems.append(f"{name} imports {mod}")
            if not mod.startswith("amct_hf"):
                continue
            target = mod
            if mod == "amct_hf" and names:  # from amct_hf import x / from .. import x
                target = f"amct_hf.{names[0]}"
            if target.split(".")[1:2] != [top] and _layer(target) is not None and own is not None \
                    and _layer(target) > own:
                problems.append(f"{name} (layer {own}) imports the higher {target} (layer {_layer(target)})")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    problems.append(f"{name} imports the private name {n} from {mod}")
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    unplaced = [name for name, _ in _modules() if name != "amct_hf" and _layer(name) is None]
    assert not unplaced, unplaced


def test_no_import_cycle_between_modules():
    graph = {}
    for name, path in _modules():
        deps = set()
        for mod, names in _imports(name, path):
            if mod.startswith("amct_hf") and mod != name:
                deps.add(mod)
                deps.update(f"{mod}.{n}" for n in names)
        graph[name] = {d for d in deps if d in dict(_modules()) and d != "amct_hf"}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(trail + [node])
        state[node] = "open"
        for dep in graph.get(node, ()):
            if not (dep.startswith(node + ".") or node.startswith(dep + ".")):  # package <-> member
                visit(dep, trail + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_registry_is_complete_right_after_import_and_cli_start_is_light():
    code = ("import sys, amct_hf, amct_hf.cli; heavy = [m for m in ('torch', 'transformers') if m in sys.modules];"
            "from amct_hf.observers import OBSERVERS; print(heavy, sorted(OBSERVERS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == ("[] [('hfmg', 'amct'), ('hfmg', 'exact'), ('hfmg', 'streaming'), "
                   "('ifmr', 'amct'), ('ifmr', 'exact'), ('ifmr', 'streaming')]"), out


def test_an_unknown_observer_kind_is_a_clear_error():
    import pytest

    from amct_hf.errors import InvalidArgumentError
    from amct_hf.observers import make_observer
    from amct_hf.settings.quant_params import parse_quant_algo_params
    with pytest.raises(InvalidArgumentError, match="no observer for act_algo='ifmr' in mode='fast'; known: "):
        make_observer(parse_quant_algo_params(None), "fast", 4)
