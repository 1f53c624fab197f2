"""Each contract a run's files and numbers keep has one home; these tests fail when a second place spells it out.

The homes: plumbing.py for a run's checkpoint names and how to find them; sac_model.checkpoint_config for
reading a checkpoint's config; sac_model.is_solved for the stop rule; sac_model.evaluation_seed and
check_seed for the episode seeds; sac_model.Tag for the TensorBoard tags. Everything outside tests/ is read
as Python syntax (docstrings and help texts may still name the files and tags to a reader).
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TAG = re.compile(r"(charts|eval|losses)/\w+")


def source_files() -> list[Path]:
    """The repository's Python files outside tests/, as git tracks them (new, untracked ones included)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in listed if not name.startswith("tests/") and (REPO / name).is_file()]


def places(predicate, allowed: dict[str, set[str]]) -> list[str]:
    """'file:line in function' of every node `predicate` accepts, outside the allowed functions of each file
    (an empty set allows the whole file)."""
    found = []
    for path in source_files():
        name = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text())
        for function, node in walk_with_function(tree):
            if predicate(node) and not (name in allowed and (not allowed[name] or function in allowed[name])):
                found.append(f"{name}:{node.lineno} in {function}")
    return found


def walk_with_function(tree: ast.AST, function: str = "<module>"):
    """Every node with the name of the innermost function or class around it."""
    for child in ast.iter_child_nodes(tree):
        inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else function
        yield inner, child
        yield from walk_with_function(child, inner)


def strings(node: ast.AST) -> list[str]:
    """The literal text of a string constant, or the literal pieces of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [value.value for value in node.values if isinstance(value, ast.Constant)]
    return []


def starts_with(node: ast.AST, pattern: re.Pattern) -> bool:
    """An f-string whose literal beginning matches `pattern` (f"step_{step}.pt", f"charts/lr_{name}")."""
    return (isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant)
            and pattern.match(node.values[0].value) is not None)


def names_a_checkpoint_file(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("glob", "rglob"):
        return any(".pt" in text for arg in node.args for text in strings(arg))
    return starts_with(node, re.compile("step_")) or any(
        text == "final.pt" or text.endswith("/final.pt") for text in strings(node))


def reads_the_config_by_key(node: ast.AST) -> bool:
    return (isinstance(node, ast.Subscript) and strings(node.slice) == ["config"]
            and isinstance(node.value, ast.Subscript) and strings(node.value.slice) == ["metadata"])


def compares_a_lower_bound(node: ast.AST) -> bool:
    if not isinstance(node, ast.Compare) or not isinstance(node.left, ast.Call):
        return False
    func = node.left.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith("lower_bound") and any(isinstance(op, (ast.GtE, ast.Gt)) for op in node.ops)


def computes_an_episode_seed(node: ast.AST) -> bool:
    operands = (node.left, node.right) if isinstance(node, ast.BinOp) else ()
    return any(isinstance(side, ast.Name) and side.id.endswith("_SEED_OFFSET") for side in operands)


def spells_a_tag(node: ast.AST) -> bool:
    constant = isinstance(node, ast.Constant) and isinstance(node.value, str) and TAG.fullmatch(node.value)
    return bool(constant) or starts_with(node, TAG)


@pytest.mark.parametrize("predicate, allowed, home", [
    (names_a_checkpoint_file, {"plumbing.py": set()}, "plumbing.py's checkpoint names"),
    (reads_the_config_by_key, {"sac_model.py": {"checkpoint_config"}}, "sac_model.checkpoint_config"),
    (compares_a_lower_bound, {"sac_model.py": {"is_solved"}}, "sac_model.is_solved"),
    (computes_an_episode_seed, {"sac_model.py": {"evaluation_seed", "check_seed"}},
     "sac_model.evaluation_seed and check_seed"),
    (spells_a_tag, {"sac_model.py": {"Tag", "critic_loss", "learning_rate"}}, "sac_model.Tag"),
])
def test_a_contract_is_spelled_out_in_its_home_alone(predicate, allowed, home):
    assert places(predicate, allowed) == [], f"use {home} instead"


@pytest.mark.parametrize("predicate, code", [
    (names_a_checkpoint_file, 'folder / "final.pt"'),
    (names_a_checkpoint_file, 'folder.glob("step_*.pt")'),
    (names_a_checkpoint_file, 'f"step_{step:09d}.pt"'),
    (reads_the_config_by_key, 'checkpoint["metadata"]["config"]'),
    (compares_a_lower_bound, "check_lower_bound(mean, std, 100, 2.0) >= target"),
    (computes_an_episode_seed, "config.seed + TARGET_SEED_OFFSET + k * 100"),
    (spells_a_tag, 'writer.add_scalar("eval/return_mean", value, step)'),
    (spells_a_tag, 'f"charts/lr_{name}"'),
])
def test_each_contract_check_recognises_a_second_home(predicate, code):
    """The checks above would see a drift: each finds the spelling it forbids."""
    assert any(predicate(node) for node in ast.walk(ast.parse(code)))
