"""numpydoc docstrings on the public API (issue #12).

For every public function and class of the covered modules (their ``__all__``, or for modules without one the
public names defined in the module itself), and for the public methods those classes define:

- a docstring with a one-line summary;
- a ``Parameters`` section when the callable takes parameters (other than ``self`` / ``cls``), documenting
  every parameter of the signature and nothing else (lines ``name : type`` at the section's indentation, with
  ``a, b : type`` and ``*args`` / ``**kwargs`` allowed); dataclasses, named tuples and pydantic models may
  document their fields under ``Attributes`` instead;
- a ``Returns`` (or ``Yields``) section when the body returns (yields) a value, read from the source.

Extend :data:`COVERED_MODULES` when a subpackage's docstrings are complete.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap

import pydantic
import pytest

#: Modules whose public API must carry numpydoc docstrings.
COVERED_MODULES = (
    "spatial_assets.celltyping",
    "spatial_assets.generative",
    "spatial_assets.platforms",
    "spatial_assets.datasets",
    "spatial_assets.pl",
    "spatial_assets.geometry",
    "spatial_assets.metrics",
    "spatial_assets.params",
    "spatial_assets.decomposition",
    "spatial_assets.segmentation",
    "spatial_assets.soscope",
    "spatial_assets.io",
)

#: Qualified names left out on purpose, with the reason.
SKIPPED = {
    "spatial_assets.celltyping.measure_nucleus_features": "being replaced by the nuclei work",
}

_SECTION = re.compile(r"^(?P<name>[A-Z][A-Za-z ]+)\n-{3,}\s*$", re.M)
_ENTRY = re.compile(r"^(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?::.*)?$")


def _sections(doc: str) -> dict[str, str]:
    """Split a (dedented) numpydoc docstring into ``{section name: body}``."""
    heads = list(_SECTION.finditer(doc))
    out = {}
    for head, nxt in zip(heads, heads[1:] + [None]):
        end = nxt.start() if nxt is not None else len(doc)
        out[head.group("name").strip()] = doc[head.end() : end]
    return out


def _documented_names(body: str) -> list[str]:
    """Names of the entries of a Parameters-like section (lines at the section's own indentation)."""
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if not lines:
        return []
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
    names = []
    for ln in lines:
        if len(ln) - len(ln.lstrip()) != indent:
            continue
        m = _ENTRY.match(ln.strip())
        assert m is not None, f"malformed entry line {ln.strip()!r} (expected 'name : type')"
        names += [n.strip().lstrip("*") for n in m.group("names").split(",")]
    return names


class _ReturnVisitor(ast.NodeVisitor):
    """Finds ``return <value>`` and ``yield`` in a function body, not in nested functions or classes."""

    def __init__(self):
        self.returns = False
        self.yields = False
        self.depth = 0

    def _nested(self, node):
        self.depth += 1
        if self.depth == 1:
            self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _nested

    def visit_Return(self, node):
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self.returns = True

    def visit_Yield(self, node):
        self.yields = True

    visit_YieldFrom = visit_Yield


def _returns_value(func) -> tuple[bool, bool]:
    src = textwrap.dedent(inspect.getsource(func))
    tree = ast.parse(src)
    node = tree.body[0]
    visitor = _ReturnVisitor()
    visitor.visit(node)
    return visitor.returns, visitor.yields


def _signature_names(func, drop_first: bool) -> list[str]:
    params = list(inspect.signature(func).parameters.values())
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p.name for p in params]


def _public_objects():
    out = []
    for modname in COVERED_MODULES:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None)
        if names is None:
            names = [
                n for n, o in vars(mod).items() if not n.startswith("_") and getattr(o, "__module__", None) == modname
            ]
        for name in names:
            obj = getattr(mod, name)
            if not (inspect.isfunction(inspect.unwrap(obj)) or inspect.isclass(obj)):  # unwrap: lru_cache etc.
                continue
            if not getattr(obj, "__module__", "").startswith("spatial_assets"):
                continue
            qual = f"{modname}.{name}"
            if qual in SKIPPED:
                continue
            out.append(pytest.param(obj, id=qual))
            if inspect.isclass(obj):
                for mname, member in vars(obj).items():
                    if mname.startswith("_"):
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isfunction(member):
                        out.append(pytest.param(member, id=f"{qual}.{mname}"))
    return out


def _check_function(func, doc: str, drop_first: bool, extra_ok: tuple[str, ...] = ()):
    secs = _sections(doc)
    names = _signature_names(func, drop_first)
    if names:
        assert "Parameters" in secs or any(s in secs for s in extra_ok), "no Parameters section"
        documented = []
        for s in ("Parameters", "Other Parameters", *extra_ok):
            if s in secs:
                documented += _documented_names(secs[s])
        missing = [n for n in names if n not in documented]
        unknown = [n for n in documented if n not in names]
        assert not missing, f"parameters not documented: {missing}"
        assert not unknown, f"documented parameters not in the signature: {unknown}"
    returns, yields = _returns_value(func)
    if yields:
        assert "Yields" in secs, "generator without a Yields section"
    elif returns:
        assert "Returns" in secs, "returns a value but has no Returns section"


def _check_class(cls, doc: str):
    secs = _sections(doc)
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        documented = []
        for s in ("Parameters", "Attributes"):
            if s in secs:
                documented += _documented_names(secs[s])
        missing = [n for n in fields if n not in documented]
        assert not missing, f"dataclass fields not documented: {missing}"
        return
    fields = None
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        fields = list(cls._fields)
    elif issubclass(cls, pydantic.BaseModel):
        fields = list(cls.model_fields)
    if fields is not None:
        documented = []
        for s in ("Parameters", "Attributes"):
            if s in secs:
                documented += _documented_names(secs[s])
        missing = [n for n in fields if n not in documented]
        unknown = [n for n in documented if n not in fields]
        assert not missing, f"fields not documented: {missing}"
        assert not unknown, f"documented fields that do not exist: {unknown}"
        return
    init = vars(cls).get("__init__")
    if inspect.isfunction(init):
        init_doc = inspect.getdoc(init) or ""
        # numpydoc: the constructor's parameters go in the class docstring (or in __init__'s own).
        _check_function(init, doc if "Parameters" in secs else init_doc, drop_first=True)


@pytest.mark.parametrize("obj", _public_objects())
def test_numpydoc(obj):
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), "no docstring"
    assert doc.splitlines()[0].strip(), "docstring does not start with a one-line summary"
    if inspect.isclass(obj):
        _check_class(obj, doc)
    else:
        drop_first = "." in obj.__qualname__
        _check_function(obj, doc, drop_first=drop_first)


def test_parser_reads_numpydoc_entries():
    doc = inspect.cleandoc(
        """Summary.

        Parameters
        ----------
        a, b : int
            Two numbers.
        *args
            More.
        **kwargs : dict
            Options, e.g. ``x : 1``.

        Returns
        -------
        int
            The sum.
        """
    )
    secs = _sections(doc)
    assert set(secs) == {"Parameters", "Returns"}
    assert _documented_names(secs["Parameters"]) == ["a", "b", "args", "kwargs"]


def test_checker_catches_undocumented_and_unknown_parameters():
    def f(a, b):
        """Summary.

        Parameters
        ----------
        a : int
            A.
        c : int
            Not in the signature.

        Returns
        -------
        int
        """
        return a + b

    with pytest.raises(AssertionError, match=r"not documented: \['b'\]"):
        _check_function(f, inspect.getdoc(f), drop_first=False)

    def g(a):
        """Summary.

        Parameters
        ----------
        a : int
            A.
        """
        return a

    with pytest.raises(AssertionError, match="no Returns section"):
        _check_function(g, inspect.getdoc(g), drop_first=False)


def _objects_with_examples():
    return [p for p in _public_objects() if ">>>" in (inspect.getdoc(p.values[0]) or "")]


@pytest.mark.parametrize("obj", _objects_with_examples())
def test_examples_are_true(obj):
    """The ``Examples`` of the public API run and print what they say (each a few seconds)."""
    import doctest

    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(obj, obj.__qualname__, globs={})
    assert tests and tests[0].examples, "no examples found"
    for t in tests:
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} example lines failed (see the output above)"
