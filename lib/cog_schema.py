"""The OpenAPI schema `cog build` bundles for this package, made from predict.py the way cog's own parser makes it.

cog no longer runs predict.py to learn its inputs: `cog build` reads the file statically (Go and tree-sitter,
`pkg/schema/python` in replicate/cog), writes the schema to `.cog/openapi_schema.json` in the image, and coglet
checks every request against it (422 naming the input). The parser's rules, followed here on Python's own syntax tree:
- `choices`: a list literal, a module-level name bound to one, `list(NAME.keys())` / `list(NAME.values())` of a
  module-level dict literal, or `+` of those. Anything else stops the build (cog's ErrChoicesNotResolvable).
- `default`: a literal or a module-level name bound to one; anything else silently becomes None.
- `description`: a string literal or a module-level name bound to one, read by cutting off the quotes (escapes
  are not decoded, adjacent literals are not joined); anything else is silently dropped.
- `ge` / `le`: number literals only (the text as a float); anything else is silently dropped.
- positional arguments and unknown keywords of `Input()` are ignored.
- a plain (non-Input) default must be a literal or a module-level name, or the build stops.
- `@concurrent(max=N)` on `run`: N an integer literal.
What cog would drop or change silently is a *problem* here, what would stop the build an *error*; a test requires
neither for predict.py (tests/test_cog_schema.py), so the schema users see on Replicate holds every enum, bound,
default and description that the code means.

    python -m lib.cog_schema            # print the schema; exit 1 listing any problem
    python -m lib.cog_schema --write    # also write .cog/openapi_schema.json (what the test Cog server loads)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lib import ROOT

# The cog CLI this schema stands for: the version the push script installs and checks (its `info.version`).
COG_VERSION = "0.23.1"
SCHEMA_PATH = Path(".cog") / "openapi_schema.json"

_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
_PRIMITIVES = {
    "bool": {"type": "boolean"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "str": {"type": "string"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
    "Any": {"type": "object"},
}
_KNOWN_KEYWORDS = {
    "default",
    "default_factory",
    "description",
    "ge",
    "le",
    "min_length",
    "max_length",
    "regex",
    "choices",
    "deprecated",
    "accept",
}
_UNSET = object()


class SchemaError(Exception):
    """predict.py as cog's parser cannot read it: `cog build` would stop."""


@dataclass
class InputField:
    name: str
    order: int
    type: dict  # the JSON schema of the value's type
    nullable: bool
    default: object = _UNSET  # _UNSET: no default (required unless nullable)
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    choices: list | None = None
    extra: dict = field(default_factory=dict)  # minLength, maxLength, pattern, deprecated, x-cog-accept


@dataclass
class Reading:
    """What cog's parser gets from predict.py."""

    inputs: dict[str, InputField]
    output: dict
    concurrency_max: int | None
    problems: list[str]  # what cog would drop or change silently


# -- literals as cog's parser reads them (its literals.go) ------------------------------------------------------------
def _text(source: str, node: ast.AST) -> str:
    return ast.get_source_segment(source, node) or ""


def _string(text: str) -> str | None:
    """cog's parseStringLiteral: the text between the quotes, as written."""
    for quote in ('"""', "'''"):
        if text.startswith(quote):
            return text[3:-3] if len(text) >= 6 else None
    if text[:1] in ('"', "'"):
        return text[1:-1] if len(text) >= 2 else None
    if text[:2] in ('r"', "r'"):
        return text[2:-1] if len(text) >= 3 else None
    return None


def _number(text: str) -> float | None:
    """cog's parseNumberLiteral: the text parsed as a float (no expressions, no names, no underscores)."""
    text = text.strip()
    return float(text) if _FLOAT.fullmatch(text) else None


def _value_text(source: str, keyword: ast.keyword) -> str:
    """A keyword argument's value as written, parentheses included (cog's parser sees them; Python's tree does not)."""
    return _text(source, keyword).split("=", 1)[1].strip()


def _literal(node: ast.AST, text: str, source: str) -> tuple[bool, object]:
    """cog's parseDefaultValue: (resolved, value) for a literal written as `text`."""
    if text.startswith("(") and not isinstance(node, ast.Tuple):  # a parenthesised expression is no literal to cog
        return False, None
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, bool):
            return True, node.value
        if isinstance(node.value, int):
            try:
                return True, int(text, 0)
            except ValueError:
                return False, None
        if isinstance(node.value, float):
            value = _number(text)
            return (value is not None), value
        if isinstance(node.value, str):
            value = _string(text)
            return (value is not None), value
        return False, None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        for parse in (lambda t: int(t, 0), float):
            try:
                return True, parse(text.replace(" ", ""))
            except ValueError:
                continue
        return False, None
    if isinstance(node, (ast.List, ast.Set, ast.Tuple)):
        items = []
        for item in node.elts:
            ok, value = _literal(item, _text(source, item), source)
            if not ok:
                if isinstance(node, ast.Tuple):  # cog keeps a tuple's parseable items
                    continue
                return False, None
            items.append(value)
        return True, items
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                continue
            ok_k, key = _literal(k, _text(source, k), source)
            ok_v, value = _literal(v, _text(source, v), source)
            if ok_k and ok_v:
                out[key] = value
        return True, out
    return False, None


def _module_scope(tree: ast.Module, source: str) -> dict:
    """Module-level names bound to literals (cog's collectModuleScope)."""
    scope = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            name, value = stmt.target.id, stmt.value
        else:
            continue
        ok, literal = _literal(value, _text(source, value), source)
        if ok:
            scope[name] = literal
    return scope


def _resolve(node: ast.AST, text: str, source: str, scope: dict) -> tuple[bool, object]:
    """cog's resolveDefaultExpr: a literal, or a module-level name bound to one."""
    if isinstance(node, ast.Name):
        return (node.id in scope), scope.get(node.id)
    return _literal(node, text, source)


def _choices(node: ast.AST, text: str, source: str, scope: dict) -> list | None:
    """cog's resolveChoicesExpr."""
    if isinstance(node, ast.List):
        ok, value = _literal(node, text, source)
        return value if ok else None
    if isinstance(node, ast.Name):
        value = scope.get(node.id)
        return value if isinstance(value, list) and node.id in scope else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _choices(node.left, _text(source, node.left), source, scope)
        right = _choices(node.right, _text(source, node.right), source, scope)
        return None if left is None or right is None else left + right
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "list"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Call)
        and isinstance(node.args[0].func, ast.Attribute)
        and isinstance(node.args[0].func.value, ast.Name)
    ):
        inner = node.args[0].func
        mapping = scope.get(inner.value.id)
        if isinstance(mapping, dict) and inner.attr in ("keys", "values"):
            return list(mapping.keys() if inner.attr == "keys" else mapping.values())
    return None


# -- types ------------------------------------------------------------------------------------------------------------
def _name(node: ast.AST) -> str:
    """`Optional`, `typing.Optional`, `cog.Path` -> the last part."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    raise SchemaError(f"unsupported type annotation {ast.unparse(node)}")


def _input_type(node: ast.AST) -> tuple[dict, bool]:
    """(JSON schema of the type, nullable) for a parameter's annotation."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
        members = [node.left, node.right]
        if sum(_name(m) == "None" for m in members if not isinstance(m, ast.BinOp)) != 1:
            raise SchemaError(f"unions other than X | None are not read here: {ast.unparse(node)}")
        inner = next(m for m in members if isinstance(m, ast.BinOp) or _name(m) != "None")
        return _input_type(inner)[0], True
    if isinstance(node, ast.Subscript):
        outer = _name(node.value)
        if outer == "Optional":
            return _input_type(node.slice)[0], True
        if outer in ("List", "list"):
            item, nullable = _input_type(node.slice)
            if nullable:
                raise SchemaError("nested generics like List[Optional[X]] are not supported by cog")
            return {"type": "array", "items": item}, False
        raise SchemaError(f"{outer}[...] is not a supported input type")
    name = _name(node)
    if name not in _PRIMITIVES:
        raise SchemaError(f"{name} is not a supported input type")
    return dict(_PRIMITIVES[name]), False


def _output_type(node: ast.AST) -> dict:
    if isinstance(node, ast.Subscript):
        outer = _name(node.value)
        if outer in ("Iterator", "AsyncIterator"):
            return {"type": "array", "items": _output_type(node.slice), "x-cog-array-type": "iterator"}
        if outer in ("List", "list"):
            return {"type": "array", "items": _output_type(node.slice)}
        if outer == "Optional":
            raise SchemaError("an Optional output is not supported by cog")
        raise SchemaError(f"{outer}[...] is not a supported output type")
    return dict(_PRIMITIVES[_name(node)]) if _name(node) in _PRIMITIVES else {"type": "object"}


# -- predict.py ---------------------------------------------------------------------------------------------------
def read(path: Path = ROOT / "predict.py", ref: str = "Predictor") -> Reading:
    """predict.py's inputs, output and concurrency as cog's parser gets them. Raises SchemaError where `cog build`
    would stop."""
    source = Path(path).read_text()
    tree = ast.parse(source)
    scope = _module_scope(tree, source)
    cog_names = _cog_imports(tree)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == ref), None)
    if cls is None:
        raise SchemaError(f"class {ref} not found in {path}")
    methods = {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    method = methods.get("run") or methods.get("predict")
    if method is None:
        raise SchemaError(f"{ref} has no run() (or predict()) method")
    problems: list[str] = []
    inputs: dict[str, InputField] = {}
    args = method.args.args[1:] if method.args.args and method.args.args[0].arg == "self" else method.args.args
    defaults = [None] * (len(method.args.args) - len(method.args.defaults)) + list(method.args.defaults)
    defaults = defaults[len(method.args.args) - len(args) :]
    for order, (arg, default) in enumerate(zip(args, defaults, strict=True)):
        if arg.annotation is None:
            raise SchemaError(f"parameter '{arg.arg}' on {method.name} has no type annotation")
        type_schema, nullable = _input_type(arg.annotation)
        f = InputField(arg.arg, order, type_schema, nullable)
        if default is not None and _is_input_call(default, cog_names):
            _read_input_call(f, default, source, scope, problems)
        elif default is not None:
            ok, value = _resolve(default, _text(source, default), source, scope)
            if not ok:
                raise SchemaError(
                    f"parameter '{arg.arg}': default `{_text(source, default)}` cannot be statically resolved"
                )
            f.default = value
        inputs[f.name] = f
    if method.returns is None:
        raise SchemaError(f"{method.name}() has no return type annotation")
    return Reading(inputs, _output_type(method.returns), _concurrency(method, cog_names, source), problems)


def _cog_imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> name in cog, for `from cog import ...`."""
    return {
        alias.asname or alias.name: alias.name
        for stmt in tree.body
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "cog"
        for alias in stmt.names
    }


def _is_input_call(node: ast.AST, cog_names: dict) -> bool:
    return isinstance(node, ast.Call) and (
        isinstance(node.func, ast.Name) and (node.func.id == "Input" or cog_names.get(node.func.id) == "Input")
    )


def _read_input_call(f: InputField, call: ast.Call, source: str, scope: dict, problems: list[str]) -> None:
    def problem(what: str) -> None:
        problems.append(f"{f.name}: {what}")

    if call.args:
        problem(f"positional arguments to Input() are ignored by cog: {', '.join(_text(source, a) for a in call.args)}")
    for kw in call.keywords:
        text = _value_text(source, kw)
        key, node = kw.arg, kw.value
        if key not in _KNOWN_KEYWORDS:
            problem(f"Input() keyword {key!r} is ignored by cog")
        elif key == "default_factory":
            raise SchemaError(f"parameter '{f.name}': default_factory is not supported in static schema generation")
        elif key == "default":
            ok, value = _resolve(node, text, source, scope)
            if not ok:
                problem(f"default `{text}` is not a literal: cog would show the default as null")
            f.default = value if ok else None
            _check_same(problem, "default", node, value if ok else None, source)
        elif key == "description":
            value = (
                (scope.get(node.id) if isinstance(scope.get(node.id), str) else None)
                if isinstance(node, ast.Name)
                else _string(text)
            )
            if value is None:
                problem(f"description `{text[:60]}` is not a string literal: cog would drop it")
            else:
                f.description = value
                _check_same(problem, "description", node, value, source)
        elif key in ("ge", "le"):
            value = _number(text)
            if value is None:
                problem(f"{key}={text} is not a number literal: cog would drop the bound")
            setattr(f, key, value)
        elif key == "choices":
            value = _choices(node, text, source, scope)
            if value is None:
                raise SchemaError(f"parameter '{f.name}': choices expression cannot be statically resolved")
            f.choices = value
        elif key in ("min_length", "max_length"):
            value = _number(text)
            if value is None:
                problem(f"{key}={text} is not a number literal: cog would drop it")
            else:
                f.extra["minLength" if key == "min_length" else "maxLength"] = int(value)
        elif key in ("regex", "accept"):
            value = _string(text)
            if value is None:
                problem(f"{key}={text} is not a string literal: cog would drop it")
            else:
                f.extra["pattern" if key == "regex" else "x-cog-accept"] = value
        elif key == "deprecated":
            if text in ("True", "False"):
                f.extra["deprecated"] = text == "True"
            else:
                problem(f"deprecated={text} is not True or False: cog would drop it")


def _check_same(problem, key: str, node: ast.AST, read_value, source: str) -> None:
    """A literal that cog reads differently from Python (escapes, adjacent strings joined) is a problem too."""
    try:
        meant = ast.literal_eval(node)
    except ValueError:
        return  # a module-level name: its literal was checked where it is read
    if isinstance(node, ast.Name):
        return
    if meant != read_value:
        problem(f"{key} {_text(source, node)[:60]} reads as {read_value!r} to cog, not {meant!r}")


def _concurrency(method: ast.AST, cog_names: dict, source: str) -> int | None:
    for d in method.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        local = target.id if isinstance(target, ast.Name) else None
        is_cog = (local is not None and cog_names.get(local) == "concurrent") or (
            isinstance(target, ast.Attribute) and target.attr == "concurrent" and _name(target.value) == "cog"
        )
        if not is_cog:
            continue
        if not isinstance(d, ast.Call) or not d.keywords and not d.args:
            return 1
        if d.args or len(d.keywords) != 1 or d.keywords[0].arg != "max":
            raise SchemaError("@concurrent only supports literal integer max=... arguments")
        ok, value = _literal(d.keywords[0].value, _value_text(source, d.keywords[0]), source)
        if not ok or not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SchemaError("@concurrent max must be an integer literal of at least 1")
        if value > 1 and not isinstance(method, ast.AsyncFunctionDef):
            raise SchemaError("@concurrent(max > 1) requires an async run() or predict() method")
        return value
    return None


# -- the OpenAPI document (cog's openapi_spec.go) ---------------------------------------------------------------------
def _go_number(x):
    """Go's encoding/json writes a whole float without a fraction: 256, not 256.0."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _title(name: str) -> str:
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


def openapi(reading: Reading, version: str = COG_VERSION) -> dict:
    properties, required, enums = {}, [], {}
    for name, f in reading.inputs.items():
        prop: dict = {"x-order": f.order}
        if f.choices:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": [_go_number(c) for c in f.choices],
                "type": f.type.get("type", "string"),
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(f.type)
            if f.nullable:
                prop["nullable"] = True
        # A None default on a field that is not nullable is no default: cog makes the field required.
        has_default = f.default is not _UNSET and not (f.default is None and not f.nullable)
        if not has_default and not f.nullable:
            required.append(name)
        if has_default:
            prop["default"] = _go_number(f.default)
        if f.nullable:
            prop["nullable"] = True
        if f.description is not None:
            prop["description"] = f.description
        if f.ge is not None:
            prop["minimum"] = _go_number(f.ge)
        if f.le is not None:
            prop["maximum"] = _go_number(f.le)
        prop.update(f.extra)
        properties[name] = prop
    input_schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    ref = "#/components/schemas/"
    error = {"description": "Validation Error", "content": _json({"$ref": ref + "HTTPValidationError"})}
    ok_any = {"description": "Successful Response", "content": _json({})}
    components = {
        "Input": input_schema,
        "Output": {**reading.output, "title": "Output"},
        **enums,
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": ref + "Input"}},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": ref + "Input"},
                "output": {"$ref": ref + "Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": ref + "ValidationError"}}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok_any}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": ok_any},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": _json({"$ref": ref + "PredictionRequest"})},
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": _json({"$ref": ref + "PredictionResponse"}),
                    },
                    "422": error,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": ok_any, "422": error},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def schema(root: Path = ROOT) -> dict:
    """The schema for the project at `root`; raises SchemaError on anything cog would not build or would drop."""
    reading = read(Path(root) / "predict.py")
    if reading.problems:
        raise SchemaError(
            "predict.py has values cog's parser would drop or change:\n  " + "\n  ".join(reading.problems)
        )
    return openapi(reading)


def write(root: Path = ROOT) -> Path:
    """Write the schema where coglet looks for it (.cog/openapi_schema.json under the server's working directory)."""
    from lib.atomic import write_atomically

    path = Path(root) / SCHEMA_PATH
    path.parent.mkdir(exist_ok=True)
    write_atomically(path, json.dumps(schema(root), indent=1) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"also write {SCHEMA_PATH}")
    args = parser.parse_args(argv)
    try:
        document = schema()
    except SchemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.write:
        print(f"wrote {write()}", file=sys.stderr)
    print(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
