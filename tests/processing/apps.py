"""Applications the configuration tests load by ``app: "module:attribute"``, as users' are."""

from __future__ import annotations

from payler.processing import Application, Output

app = Application("echo")


@app.handler()
async def echo(body: dict) -> Output:  # type: ignore[type-arg]
    return Output("echoed", body)


not_an_app = object()
