"""A bare FastAPI + aiohttp proxy in front of TorchServe: the floor DuoServe is compared with
(bench/floor.py). No validation, routing, metrics or resilience: what any gateway costs."""

import os

import aiohttp
import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

UP = os.environ["UPSTREAM"]
KEY = os.environ["KEY"]
app = FastAPI()
S = {}


@app.post("/v2/models/{model}/infer")
async def infer(request: Request, model: str) -> Response:
    if "s" not in S:
        S["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    body = orjson.loads(await request.body())
    inp = body["inputs"][0]
    async with S["s"].post(
        f"{UP}/predictions/digits",
        data=orjson.dumps({"inputs": [inp]}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    ) as r:
        out = await r.read()
    return Response(out, media_type="application/json")
