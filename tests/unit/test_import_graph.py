"""The layering the design states, checked over the import graph of every module (docs/architecture.md).

orchestrator -> trainers -> data_pipeline: no module imports a package above its own, no two modules
import each other (directly or round a longer loop, lazy imports inside functions included), Ray
is imported only where the design allows it, and Hydra only by the orchestrator.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"data_pipeline": 0, "trainers": 1, "orchestrator": 2}
# Ray Train and Ray Jobs are the orchestrator's; `kiln prepare` tokenizes with Ray Data.
MAY_IMPORT_RAY = ("orchestrator", "data_pipeline.records")
MAY_IMPORT_HYDRA = ("orchestrator",)


def module_name(path: Path) -> str:
    """Dotted module name of a file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path, name: str) -> str:
    """The package relative imports in module `name` (at path) start from."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def targets(node: ast.AST, package: str) -> set[str]:
    """The module names one import statement may load (nothing for other statements)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name a file imports, anywhere in it (relative imports resolved)."""
    package = package_of(path, name)
    return {t for node in ast.walk(ast.parse(path.read_text(), str(path))) for t in targets(node, package)}


def import_graph() -> dict[str, set[str]]:
    """Module -> what it imports, for every module of the three packages."""
    files = {module_name(f): f for package in LAYERS for f in (ROOT / package).rglob("*.py")}
    return {name: imported_names(path, name) for name, path in files.items()}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module `name` is one of prefixes or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each; empty when the layering holds."""
    problems = []
    ours = {name: {i for i in imports if i in graph and i != name} for name, imports in graph.items()}
    for name, imports in sorted(graph.items()):
        layer = LAYERS[name.split(".")[0]]
        for target in sorted(ours[name]):
            if LAYERS[target.split(".")[0]] > layer:
                problems.append(f"upward import: {name} imports {target}")
        roots = {i.split(".")[0] for i in imports}
        if "ray" in roots and not within(name, MAY_IMPORT_RAY):
            problems.append(f"{name} imports ray (only {', '.join(MAY_IMPORT_RAY)} may)")
        if roots & {"hydra", "omegaconf"} and not within(name, MAY_IMPORT_HYDRA):
            problems.append(f"{name} imports Hydra/OmegaConf (only the orchestrator composes config)")
    problems.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(ours))
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One closed path per strongly connected group of modules that import each other."""
    found, done = [], set()
    for start in sorted(edges):
        if start in done:
            continue
        path = shortest_path_back(edges, start)
        if path:
            found.append(path)
            done.update(path)
    return found


def shortest_path_back(edges: dict[str, set[str]], start: str) -> list[str] | None:
    """start -> ... -> start along imports, if any (breadth first, so the reported loop is short)."""
    frontier, came_from = [start], {start: None}
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges.get(node, ())):
                if target == start:
                    path = [node]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    return None


def loaded_at_import(name: str, files: dict[str, Path]) -> set[str]:
    """Top-level package names that importing module `name` loads (imports inside functions and
    `if TYPE_CHECKING:` blocks excluded), following our own modules."""
    seen, outside, todo = set(), set(), [name]
    while todo:
        module = todo.pop()
        if module in seen or module not in files:
            continue
        seen.add(module)
        for imported in module_level_imports(files[module], module):
            if imported in files:
                todo.append(imported)
            elif imported.split(".")[0] not in LAYERS:
                outside.add(imported.split(".")[0])
        parent = module.rpartition(".")[0]
        if parent:
            todo.append(parent)  # a package's __init__ runs first
    return outside


def module_level_imports(path: Path, name: str) -> set[str]:
    """What a module imports when it is imported: statements at its top level, try/if blocks included."""
    package = package_of(path, name)
    found: set[str] = set()

    def visit(statements) -> None:
        for node in statements:
            found.update(targets(node, package))
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text(), str(path)).body)
    return found


def test_kiln_stop_status_and_the_event_log_load_no_torch():
    # `kiln stop` must land between two steps of a fast run: torch's seconds of import would not. `kiln status`
    # is what scripts and on-call engineers poll: importing torch for it took 2.2 s a call instead of 0.8 s.
    files = {module_name(f): f for package in LAYERS for f in (ROOT / package).rglob("*.py")}
    light = ("orchestrator.cli", "orchestrator.cli.status", "orchestrator.run.lifecycle", "trainers.checkpoint.layout")
    for module in (*light, "trainers.preemption", "trainers.run.events", "orchestrator.run.registry"):
        assert "torch" not in loaded_at_import(module, files), module
    assert "torch" in loaded_at_import("trainers.loop", files), "the check must see torch where it is loaded"


def test_ray_trains_controller_loads_no_training_stack():
    # Ray Train's controller unpickles KilnTorchConfig, train_worker (orchestrator.launch.ray_worker) and the run's
    # config before it starts the worker group: torch and transformers there delayed kiln train's first
    # step by ~5 s on 2 CPUs (benchmarks/startup.py). The workers import the loop in train_worker.
    files = {module_name(f): f for package in LAYERS for f in (ROOT / package).rglob("*.py")}
    for module in ("orchestrator.launch.ray_worker", "orchestrator.config", "orchestrator.run.attempts"):
        assert not loaded_at_import(module, files) & {"torch", "transformers", "deepspeed"}, module
    assert "transformers" in loaded_at_import("trainers.loop", files), "the check must see transformers where it is"


def test_the_three_packages_import_only_downwards_without_cycles():
    graph = import_graph()
    assert len(graph) > 40, "the scan found too few modules to be looking at the packages"
    assert violations(graph) == []


def test_the_check_catches_each_kind_of_violation():
    graph = {
        "data_pipeline.storage": {"trainers.run.events"},
        "trainers.run.events": {"data_pipeline.storage", "ray.train"},
        "trainers.checkpoint.store": {"trainers.export"},
        "trainers.export": {"trainers.checkpoint.shapes"},
        "trainers.checkpoint.shapes": {"trainers.checkpoint.store", "omegaconf"},
        "orchestrator.cli": {"trainers.run.events", "ray", "hydra"},
        "data_pipeline.records": {"ray.data"},
    }
    problems = violations(graph)
    assert "upward import: data_pipeline.storage imports trainers.run.events" in problems
    assert "trainers.run.events imports ray (only orchestrator, data_pipeline.records may)" in problems
    assert "trainers.checkpoint.shapes imports Hydra/OmegaConf (only the orchestrator composes config)" in problems
    assert "import cycle: data_pipeline.storage -> trainers.run.events -> data_pipeline.storage" in problems
    assert (
        "import cycle: trainers.checkpoint.shapes -> trainers.checkpoint.store -> trainers.export"
        " -> trainers.checkpoint.shapes" in problems
    )
    assert len(problems) == 5, problems


# The concept packages (docs/architecture.md opens with their map): four rules over the same graph.
CLI = "orchestrator.cli"
RUN_CONTRACT = "trainers.run"
SWEEP = "orchestrator.sweep"
NOT_FOR_THE_SWEEP = ("trainers.loop", "trainers.strategies")
CHECKPOINTS, STRATEGIES = "trainers.checkpoint", "trainers.strategies"
# Run-folder names only trainers/run/folder.py spells; "STOP", "logs", "ray", "wandb" and "tokenizer" are
# left out of the check, being also a sweep's STOP file, a module, a tracker and a dataset manifest's key.
RUN_FOLDER_NAMES = ("run.json", "config.yaml", "metrics.jsonl", "events", "checkpoints", "init_model")


def cli_violations(graph: dict[str, set[str]]) -> list[str]:
    """Nothing but the CLI's own modules imports orchestrator.cli: the CLI is the top of the house."""
    return [
        f"{name} imports {target} (only {CLI}'s own modules may)"
        for name, imports in sorted(graph.items())
        if not within(name, (CLI,))
        for target in sorted(imports)
        if within(target, (CLI,))
    ]


def sweep_violations(graph: dict[str, set[str]]) -> list[str]:
    """The sweep expands and schedules trials; it never imports the training loop or a strategy."""
    return [
        f"{name} imports {target} (the sweep never imports the training loop or strategies)"
        for name, imports in sorted(graph.items())
        if within(name, (SWEEP,))
        for target in sorted(imports)
        if within(target, NOT_FOR_THE_SWEEP)
    ]


def checkpoint_violations(graph: dict[str, set[str]]) -> list[str]:
    """trainers.checkpoint is below trainers.strategies: a strategy saves and loads its shards with the checkpoint
    package's formats, safe loading and resharding, and the checkpoint package speaks to a strategy only through
    its own protocols (trainers/checkpoint/shards.py), never importing one (lazily or for typing either)."""
    return [
        f"{name} imports {target} ({STRATEGIES} use {CHECKPOINTS}, never the other way round)"
        for name, imports in sorted(graph.items())
        if within(name, (CHECKPOINTS,))
        for target in sorted(imports)
        if target in graph and within(target, (STRATEGIES,))
    ]


def contract_names(files: dict[str, Path]) -> dict[str, str]:
    """Each top-level name trainers.run defines -> its module."""
    names = {}
    for name, path in files.items():
        if within(name, (RUN_CONTRACT,)):
            for node in ast.parse(path.read_text(), str(path)).body:
                if isinstance(node, ast.FunctionDef | ast.ClassDef):
                    names[node.name] = name
                elif isinstance(node, ast.Assign):
                    names.update({t.id: name for t in node.targets if isinstance(t, ast.Name)})
    return names


def takes_past_the_contract(node: ast.AST) -> bool:
    """An import from a trainers module outside trainers.run."""
    return (
        isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("trainers.")
        and not within(node.module or "", (RUN_CONTRACT,))
    )


def run_folder_violations(files: dict[str, Path]) -> list[str]:
    """The orchestrator reads run folders only through trainers.run: it takes the contract's names (run
    folder layout, run state, events, the STOP request) from trainers.run, and no module outside
    trainers.run spells a run folder's names."""
    contract = contract_names(files)
    problems = []
    for name, path in sorted(files.items()):
        if within(name, (RUN_CONTRACT,)) or not within(name, ("orchestrator", "trainers")):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if within(name, ("orchestrator",)) and takes_past_the_contract(node):
                assert isinstance(node, ast.ImportFrom)
                taken = sorted(a.name for a in node.names if a.name in contract)
                problems.extend(
                    f"{name} imports {t} from {node.module} (the run contract's, import it from {contract[t]})"
                    for t in taken
                )
            if isinstance(node, ast.Constant) and node.value in RUN_FOLDER_NAMES:
                problems.append(f"{name} spells the run-folder name {node.value!r} (use trainers.run.folder's)")
    return problems


def source_files() -> dict[str, Path]:
    return {module_name(f): f for package in LAYERS for f in (ROOT / package).rglob("*.py")}


def test_nothing_imports_the_cli():
    assert cli_violations(import_graph()) == []


def test_the_orchestrator_reads_run_folders_only_through_trainers_run():
    assert run_folder_violations(source_files()) == []


def test_the_sweep_never_imports_the_training_loop():
    assert sweep_violations(import_graph()) == []


def test_checkpoints_never_import_strategies():
    graph = import_graph()
    assert any(
        within(name, (STRATEGIES,)) and within(i, (CHECKPOINTS,)) for name, imports in graph.items() for i in imports
    )
    assert checkpoint_violations(graph) == []


def test_the_concept_rules_catch_each_offending_import(tmp_path):
    graph = {
        "orchestrator.cli": {"orchestrator.cli.options"},
        "orchestrator.cli.options": set(),
        "orchestrator.sweep.jobs": {"orchestrator.cli.cluster", "trainers.loop", "trainers.strategies.ddp"},
        # schedule takes a name from the package's __init__, shapes from a module: each import is named once
        "trainers.checkpoint.schedule": {
            "trainers.checkpoint.store",
            "trainers.strategies",
            "trainers.strategies.Strategy",
        },
        "trainers.checkpoint.shapes": {"trainers.strategies.dcp_io", "trainers.strategies.dcp_io.read_metadata"},
        "trainers.checkpoint.store": set(),
        "trainers.strategies": {"trainers.strategies.dcp_io"},
        "trainers.strategies.dcp_io": {"trainers.checkpoint", "trainers.checkpoint.safe_load"},
    }
    assert cli_violations(graph) == [
        "orchestrator.sweep.jobs imports orchestrator.cli.cluster (only orchestrator.cli's own modules may)"
    ]
    assert sweep_violations(graph) == [
        "orchestrator.sweep.jobs imports trainers.loop (the sweep never imports the training loop or strategies)",
        "orchestrator.sweep.jobs imports trainers.strategies.ddp (the sweep never imports the training loop or "
        "strategies)",
    ]
    assert checkpoint_violations(graph) == [
        "trainers.checkpoint.schedule imports trainers.strategies (trainers.strategies use trainers.checkpoint, "
        "never the other way round)",
        "trainers.checkpoint.shapes imports trainers.strategies.dcp_io (trainers.strategies use trainers.checkpoint, "
        "never the other way round)",
    ]
    contract = tmp_path / "state.py"
    contract.write_text("class RunState:\n    pass\n")
    offender = tmp_path / "status.py"
    offender.write_text("from trainers.loop import RunState\nRECORD = 'run.json'\n")
    problems = run_folder_violations({"trainers.run.state": contract, "orchestrator.run.status": offender})
    assert problems == [
        "orchestrator.run.status imports RunState from trainers.loop (the run contract's, import it from "
        "trainers.run.state)",
        "orchestrator.run.status spells the run-folder name 'run.json' (use trainers.run.folder's)",
    ]
