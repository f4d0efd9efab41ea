"""The README's settings table is checked against the code and the packages' configs.

The settings are found in the code itself, so a setting added anywhere is checked without
touching this test: every environment read in the shipped code (`shared/embed_serving/**.py`
and each package's `model/model.py`), whether through the settings readers (`_env_int(NAME,
default, ...)`, any `_env_*` function) or directly (`os.environ.get(NAME, default)`,
`os.getenv`, `os.environ[NAME]`), with NAME a string literal or a module constant. The default
is the expression the code passes, evaluated statically: literals and arithmetic, `min`/`max`,
module constants and class attributes (`ImageLimits.max_bytes`), parameter defaults of the
enclosing function as each package's `model.py` calls it (`batch_max_tokens=65536`), another
setting's default where the code reuses its value (`4 * max_request`), and `... or "sdpa"`.
The token-limit settings are read in a loop (`Settings.from_env`): their names are
`TOKEN_LIMIT_SETTINGS`, their defaults what each package's `model.py` passes.

The table (README "Settings") has a `default` column (what the code uses when nothing sets
it) and one column per package (what its `config.yaml` sets; `–` where it sets nothing, `n/a`
where the setting does not apply to it)."""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from embed_serving.settings import TOKEN_LIMIT_SETTINGS
from tools.local_server import ROOT

LIBRARY = ROOT / "shared" / "embed_serving"
PACKAGES = sorted(p.parent.parent.name for p in ROOT.glob("*/model/model.py"))
UNKNOWN = object()  # a default the code computes at run time (e.g. from the checkpoint)
UNSET = "–"  # the table's word for "no value"
# Where an environment read may take its name from a variable: the readers themselves, and the
# token-limit loop (names: TOKEN_LIMIT_SETTINGS, defaults: each model.py).
DYNAMIC_READERS = {("settings.py", "from_env")}


@dataclass
class Read:
    name: str
    default: ast.expr | None  # None: the code has no default (unset means "not given")
    where: str
    module: str  # importable module whose globals the default is evaluated in ("" for none)
    params: dict[str, ast.expr]  # defaults of the enclosing function's parameters
    # Names the enclosing function binds to another setting's value (`max_request :=
    # _env_int("MAX_REQUEST_BYTES", ...)`), mapped to that setting's default expression.
    bound: dict[str, ast.expr]


def _is_environ(node: ast.AST) -> bool:
    # os.environ, or `environ` imported from os
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _reader_args(call: ast.Call) -> tuple[ast.expr, ast.expr | None] | None:
    """(name, default) of an environment read, or None if `call` is not one."""
    func = call.func
    fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if not call.args:
        return None
    default = call.args[1] if len(call.args) > 1 else None
    for kw in call.keywords:
        if kw.arg == "default":
            default = kw.value
    if fname.startswith("_env_"):
        return call.args[0], default
    if isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value):
        return call.args[0], default
    if isinstance(func, ast.Attribute) and func.attr == "getenv":
        return call.args[0], default
    return None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _or_default(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.expr | None:
    """`os.environ.get(X, "").strip().lower() or "sdpa"`: the default is what follows `or`."""
    while isinstance(parent := parents.get(node), ast.Attribute | ast.Call) and (
        not isinstance(parent, ast.Call) or parent.func is node
    ):
        node = parent
    parent = parents.get(node)
    if (
        isinstance(parent, ast.BoolOp)
        and isinstance(parent.op, ast.Or)
        and parent.values[0] is node
    ):
        return parent.values[-1]
    return None


def _function_params(fn: ast.FunctionDef) -> dict[str, ast.expr]:
    args = fn.args
    positional = args.posonlyargs + args.args
    with_defaults = positional[len(positional) - len(args.defaults) :]
    params = {a.arg: d for a, d in zip(with_defaults, args.defaults, strict=True)}
    kw = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    params.update({a.arg: d for a, d in kw if d is not None})
    return params


def discover() -> tuple[list[Read], list[str]]:
    """Every environment read in the shipped code, and the reads whose name is not static."""
    reads: list[Read] = []
    dynamic: list[str] = []
    files = sorted(LIBRARY.rglob("*.py")) + [ROOT / p / "model" / "model.py" for p in PACKAGES]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        parents = _parents(tree)
        constants = {
            t.id: n.value.value
            for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
            for t in n.targets
            if isinstance(t, ast.Name) and isinstance(n.value.value, str)
        }
        in_library = path.is_relative_to(LIBRARY)
        module = (
            "embed_serving." + ".".join(path.relative_to(LIBRARY).with_suffix("").parts)
            if in_library
            else ""
        ).removesuffix(".__init__")
        for node in ast.walk(tree):
            args: tuple[ast.expr, ast.expr | None] | None = None
            if isinstance(node, ast.Call):
                args = _reader_args(node)
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.ctx, ast.Load)
                and _is_environ(node.value)
            ):
                args = (node.slice, None)
            if args is None:
                continue
            fn = _enclosing_function(node, parents)
            function = fn.name if fn is not None else ""
            if function.startswith("_env_"):
                continue  # the readers' own bodies
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            name_node, default = args
            if isinstance(name_node, ast.Constant) and isinstance(name_node.value, str):
                name = name_node.value
            elif isinstance(name_node, ast.Name) and name_node.id in constants:
                name = constants[name_node.id]
            else:
                if (path.name, function) not in DYNAMIC_READERS:
                    dynamic.append(where)
                continue
            default = _or_default(node, parents) or default
            params = _function_params(fn) if fn is not None else {}
            bound = {
                n.target.id: reader[1]
                for n in ast.walk(fn if fn is not None else tree)
                if isinstance(n, ast.NamedExpr)
                and isinstance(n.value, ast.Call)
                and (reader := _reader_args(n.value)) is not None
                and reader[1] is not None
            }
            reads.append(Read(name, default, where, module, params, bound))
    return reads, dynamic


def _enclosing_function(
    node: ast.AST, parents: dict[ast.AST, ast.AST]
) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    while (node := parents.get(node)) is not None:  # type: ignore[assignment]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node
    return None


class _Evaluator:
    """Static value of a default expression; UNKNOWN where it depends on run time."""

    def __init__(self, read: Read, overrides: dict[str, ast.expr]):
        self.globals = vars(importlib.import_module(read.module)) if read.module else {}
        self.params = {**read.params, **overrides}
        self.bound = read.bound

    def __call__(self, node: ast.expr | None) -> Any:
        try:
            return self._eval(node)
        except _Unknown:
            return UNKNOWN

    def _eval(self, node: ast.expr | None) -> Any:
        match node:
            case None:
                return None
            case ast.Constant(value=value):
                return value
            case ast.NamedExpr(value=value):
                return self._eval(value)
            case ast.UnaryOp(op=ast.USub(), operand=operand):
                return -self._eval(operand)
            case ast.BinOp(left=left, op=op, right=right):
                a, b = self._eval(left), self._eval(right)
                ops = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__",
                       ast.LShift: "__lshift__", ast.FloorDiv: "__floordiv__",
                       ast.Div: "__truediv__", ast.Pow: "__pow__"}  # fmt: skip
                if type(op) not in ops:
                    raise _Unknown
                return getattr(a, ops[type(op)])(b)
            case ast.Call(func=ast.Name(id="min" | "max" as fn), args=args, keywords=[]):
                values = [self._eval(a) for a in args]
                return min(values) if fn == "min" else max(values)
            case ast.Name(id=name) if name in self.bound:
                return self._eval(self.bound[name])
            case ast.Name(id=name) if name in self.params:
                return self._eval(self.params[name])
            case ast.Name(id=name) if name in self.globals:
                return self.globals[name]
            case ast.Attribute(value=value, attr=attr):
                return getattr(self._eval(value), attr)
        raise _Unknown


class _Unknown(Exception):
    pass


def _package_calls(package: str) -> tuple[dict[str, ast.expr], dict[str, ast.expr]]:
    """From a package's model.py: keyword arguments of its `Settings.from_env` call, and the
    default it gives each token-limit setting (`("MAX_INPUT_TOKENS", 8192)`)."""
    tree = ast.parse((ROOT / package / "model" / "model.py").read_text())
    overrides: dict[str, ast.expr] = {}
    token_limits: dict[str, ast.expr] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_env":
            overrides.update({kw.arg: kw.value for kw in node.keywords if kw.arg})
        if (
            isinstance(node, ast.Tuple)
            and len(node.elts) == 2
            and isinstance(node.elts[0], ast.Constant)
            and node.elts[0].value in TOKEN_LIMIT_SETTINGS
        ):
            token_limits[node.elts[0].value] = node.elts[1]
    return overrides, token_limits


def code_defaults() -> dict[str, dict[str, Any]]:
    """setting -> package -> the default the code uses there (a package that does not read
    the setting is absent)."""
    reads, dynamic = discover()
    assert not dynamic, (
        f"environment reads whose setting name is not a literal or a module constant: {dynamic}"
    )
    out: dict[str, dict[str, Any]] = {}
    for package in PACKAGES:
        overrides, token_limits = _package_calls(package)
        for read in reads:
            if read.where.startswith(("shared/", f"{package}/")):
                value = _Evaluator(read, overrides)(read.default)
                out.setdefault(read.name, {})[package] = value
        for name, expr in token_limits.items():
            read = Read(name, expr, "", "", {}, {})
            out.setdefault(name, {})[package] = _Evaluator(read, {})(expr)
    return out


def readme_table() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The README's settings table: its header, and setting -> column -> cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    header, table = [c.strip("`") for c in split[0]], split[2:]  # split[1]: the |---| line
    assert header[0] == "setting", header
    out = {}
    for cells in table:
        assert len(cells) == len(header), cells
        out[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return header, out


def _render(value: Any) -> str:
    if value is None or value == "":
        return UNSET
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _configs() -> dict[str, dict[str, str]]:
    out = {}
    for package in PACKAGES:
        config = yaml.safe_load((ROOT / package / "config.yaml").read_text())
        env = config.get("environment_variables") or {}
        out[package] = {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()
        }
    return out


# Read by the code but set by the platform, not by a deployment: CUDA_VISIBLE_DEVICES only
# explains a refusal to start (device.py); it is not ours to document as a setting.
PLATFORM_VARIABLES = {"CUDA_VISIBLE_DEVICES"}
CODE = {name: v for name, v in code_defaults().items() if name not in PLATFORM_VARIABLES}
HEADER, TABLE = readme_table()
CONFIGS = _configs()


def _row(name: str) -> dict[str, str]:
    if name not in TABLE:
        pytest.fail(f"{name} (read by the code) has no row in the README settings table")
    return TABLE[name]


def test_the_table_has_a_column_per_package() -> None:
    assert len(PACKAGES) >= 3, PACKAGES  # the glob found the packages
    for column in ("default", *PACKAGES, "meaning"):
        assert column in HEADER, f"README settings table: no `{column}` column in {HEADER}"


def test_every_setting_the_code_reads_is_in_the_table() -> None:
    missing = sorted(set(CODE) - set(TABLE))
    assert not missing, f"settings the code reads but the README table lacks: {missing}"


def test_every_row_is_a_setting_the_code_reads() -> None:
    stale = sorted(set(TABLE) - set(CODE))
    assert not stale, f"README settings table rows no code reads: {stale}"


@pytest.mark.parametrize("name", sorted(CODE))
def test_default_is_the_codes(name: str) -> None:
    cell = _row(name)["default"].replace("`", "")
    for package, value in CODE[name].items():
        if value is UNKNOWN:
            # Computed at run time (from the checkpoint): the cell must say from what, not
            # claim a constant.
            assert re.search(r"[A-Za-z]", cell), f"{name}: {cell!r} (default of {package})"
        elif _render(value) == UNSET:
            assert cell.startswith(UNSET), f"{name}: unset by default, the README says {cell!r}"
        else:
            want = re.escape(_render(value))
            assert re.search(rf"(?<![\w.]){want}(?![\w.])", cell), (
                f"{name}: the code's default for {package} is {_render(value)}, the README's "
                f"default column says {cell!r}"
            )


@pytest.mark.parametrize("name", sorted(CODE))
def test_package_columns_are_the_configs(name: str) -> None:
    for package in PACKAGES:
        cell = _row(name)[package].replace("`", "")
        shipped = CONFIGS[package].get(name)
        if shipped is not None:
            assert cell == shipped, f"{package}/config.yaml sets {name}={shipped}, README: {cell}"
        elif package not in CODE[name]:
            assert cell == "n/a", f"{package} does not read {name}: its cell should be n/a"
        else:
            assert cell in (UNSET, "n/a"), (
                f"{package}/config.yaml does not set {name}: its cell should be {UNSET}"
            )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_config_setting_is_read_by_its_package(package: str) -> None:
    # A misspelt or obsolete name in environment_variables would be silently ignored.
    unread = sorted(name for name in CONFIGS[package] if package not in CODE.get(name, {}))
    assert not unread, f"{package}/config.yaml sets settings its code never reads: {unread}"
