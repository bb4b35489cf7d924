"""The method table: every RPC method with its parameters, validation and handler.

Handlers are coroutine functions taking validated keyword parameters. Specs come from signatures with
``Annotated[T, Field(...)]`` hints (:func:`drivers.base.method_spec`), so what ``daemon.describe`` reports is
exactly what is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from daemon.api.errors import InvalidParams, MethodNotFound
from drivers.base import MethodSpec, method_spec
from drivers.params import ParamError, check_value

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class RpcMethod:
    spec: MethodSpec
    handler: Handler
    group: str  # "daemon", a device name, ...

    @property
    def name(self) -> str:
        return self.spec.name


class MethodTable:
    def __init__(self) -> None:
        self._methods: dict[str, RpcMethod] = {}

    def add(self, name: str, handler: Handler, spec_from: Callable[..., Any] | MethodSpec | None = None,
            group: str = "daemon") -> None:
        """Register ``name``. Its spec is taken from ``spec_from`` (a function or a MethodSpec) or the handler."""
        if name in self._methods:
            raise ValueError(f"RPC method {name} registered twice")
        if isinstance(spec_from, MethodSpec):
            spec = MethodSpec(name, spec_from.params, spec_from.doc, spec_from.returns, spec_from.func)
        else:
            spec = method_spec(name, spec_from or handler, skip_self=False)
        self._methods[name] = RpcMethod(spec, handler, group)

    def remove_group(self, group: str) -> None:
        for name in [n for n, m in self._methods.items() if m.group == group]:
            del self._methods[name]

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def names(self) -> list[str]:
        return sorted(self._methods)

    def describe(self) -> list[dict[str, Any]]:
        return [self._methods[n].spec.describe() | {"group": self._methods[n].group} for n in self.names()]

    def get(self, name: str) -> RpcMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise self._not_found(name) from None

    def _not_found(self, name: str) -> MethodNotFound:
        prefix = name.split(".", 1)[0] + "."
        near = [n for n in self.names() if n.startswith(prefix)]
        hint = f"; methods of {prefix[:-1]}: {', '.join(near)}" if near else "; daemon.describe lists every method"
        return MethodNotFound(f"no method {name!r}{hint}", data={"method": name, "similar": near})

    async def call(self, name: str, params: Any) -> Any:
        method = self.get(name)
        kwargs = bind_params(method.spec, params)
        return await method.handler(**kwargs)


def _signature(spec: MethodSpec) -> str:
    parts = []
    for p in spec.params:
        text = f"{p.name}: {p.field.allowed(p.type)}"
        if not p.required:
            text += f" = {p.default!r}"
        parts.append(text)
    return f"{spec.name}({', '.join(parts)})"


def bind_params(spec: MethodSpec, params: Any) -> dict[str, Any]:
    """Validate JSON-RPC params (object, array or absent) against a spec; InvalidParams says what is allowed."""
    names = [p.name for p in spec.params]
    if params is None:
        params = {}
    elif isinstance(params, list):
        if len(params) > len(names):
            raise InvalidParams(f"{spec.name} takes at most {len(names)} parameter(s), got {len(params)}: {_signature(spec)}",
                                data={"allowed": _signature(spec), "params": names})
        params = dict(zip(names, params))
    elif not isinstance(params, dict):
        raise InvalidParams("params must be an object (by name) or an array (by position)")
    unknown = [k for k in params if k not in names]
    if unknown:
        raise InvalidParams(f"{spec.name}: unknown parameter(s) {', '.join(map(repr, unknown))}; expected {_signature(spec)}",
                            data={"param": unknown[0], "allowed": _signature(spec), "params": names})
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name not in params:
            if p.required:
                raise InvalidParams(f"{spec.name}: missing parameter {p.name!r} ({p.field.allowed(p.type)})",
                                    data={"param": p.name, "allowed": p.field.allowed(p.type)})
            continue
        try:
            out[p.name] = check_value(params[p.name], p.field, p.name, p.type)
        except ParamError as e:
            raise InvalidParams(f"{spec.name}: parameter {e}", data={"param": p.name, "allowed": e.allowed}) from None
    return out
