"""The Ray Serve application: the ReFoCUS selector as an HTTP API (FastAPI ingress).

    refocus serve --checkpoint runs/embedded/train/policy --media-root /data/videos
    serve run serve.app:app checkpoint=runs/embedded/train/policy media_roots=/data/videos
    serve deploy serve/config.yaml        (a running cluster: `ray start --head ...`)

Endpoints: POST /v1/select, POST /v1/answer (when serve.answer_model is set), GET /healthz,
/readyz, /v1/models, /docs (OpenAPI). This file is only the HTTP and Ray Serve layer; the
logic (validation, media-root checks, caches, batched selection) is `refocus_ray.service`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from refocus_ray import service as svc
from refocus_ray.service import AnswerRequest, SelectRequest, ServiceError

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="refocus-ray frame selector",
    version="1",
    description="ReFoCUS: a learned, query-conditioned frame selector for video-LLMs. "
    "POST a video (a path under a media root, or an upload) and a question; get the K frames "
    "to show your video-LLM. Errors are JSON: {\"error\": {status, code, message}}.",
)
_OPEN_PATHS = ("/healthz", "/readyz")


@api.middleware("http")
async def _auth_and_guard(request: Request, call_next: Any) -> Any:
    """Bearer auth (when configured) for every route but the probes; an unexpected error
    becomes a JSON 500 for that request only, never a dead replica."""
    try:
        if request.url.path not in _OPEN_PATHS:
            svc.authorize(request.headers.get("authorization"))
        return await call_next(request)
    except ServiceError as e:
        return JSONResponse(e.body(), status_code=e.status)
    except Exception:  # logged; the client gets a 500, the replica lives on
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(ServiceError(500, "internal", "internal error (logged on the "
                                         "replica)").body(), status_code=500)


@api.exception_handler(ServiceError)
async def _service_error(request: Request, e: ServiceError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _body_doc(model: type[SelectRequest]) -> dict[str, Any]:
    """OpenAPI for a route that takes JSON or multipart (the handler dispatches itself)."""
    schema = model.model_json_schema()
    form = {**schema, "properties": {**schema["properties"],
                                     "file": {"type": "string", "format": "binary"}}}
    form["properties"]["options"] = {"type": "string", "description":
                                     "a JSON list, or one `options` field per option"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}}}


_ERRORS = {s: {"description": d} for s, d in [
    (400, "malformed body / no or several video sources"), (401, "bad or missing token"),
    (403, "path outside the media roots, URL fetching off"), (404, "no such file in the roots"),
    (413, "upload too large"), (415, "not JSON or multipart"),
    (422, "invalid field, k out of range, unreadable video")]}


@serve.deployment(name="AnswerModel", max_ongoing_requests=16)
class AnswerModel:
    """The answering VLM on vLLM: option scores for (frames, question, options), one prefill
    each, concurrent requests in one engine call. Returns errors as values so the caller can
    tell a bad request (e.g. an option that is not one token) from a broken engine."""

    def __init__(self, model_dir: str, answer_mode: str | None, max_frames: int, dtype: str,
                 max_model_len: int, max_batch_size: int) -> None:
        from pathlib import Path

        from refocus_ray.vllm_scoring import VLLMScorer

        self.scorer = VLLMScorer(model_dir, answer_mode=answer_mode, max_frames=max_frames,
                                 dtype=dtype, max_model_len=max_model_len)
        self.model_id = Path(model_dir).name
        self.score.set_max_batch_size(max_batch_size)

    def info(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "kind": "answer-vlm",
                "answer_mode": self.scorer.mode, "max_frames": self.scorer.max_frames}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score(self, reqs: list[tuple[Any, str, list[str]]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._score, reqs)

    def _score(self, reqs: list[tuple[Any, str, list[str]]]) -> list[dict[str, Any]]:
        try:
            return [{"scores": z} for z in self.scorer.score(reqs)]
        except Exception:  # noqa: BLE001 -- one bad request must not fail its batch-mates
            out = []
            for r in reqs:
                try:
                    out.append({"scores": self.scorer.score([r])[0]})
                except Exception as e:  # noqa: BLE001 -- returned to that request's caller
                    out.append({"error": f"{type(e).__name__}: {e}"})
            return out


@serve.deployment(name="Selector")
@serve.ingress(api)
class Selector:
    """The ingress: HTTP in, `SelectorService` for the work, policy passes batched."""

    def __init__(self, settings: dict[str, Any], answerer: DeploymentHandle | None = None) -> None:
        self.svc = svc.SelectorService(svc.Settings(**settings))
        self.answerer = answerer
        svc.set_process_token(self.svc.token)
        scfg = self.svc.scfg
        self._policy_batch.set_max_batch_size(scfg.max_batch_size)
        self._policy_batch.set_batch_wait_timeout_s(scfg.batch_wait_timeout_s)
        self._text_batch.set_max_batch_size(scfg.max_batch_size)
        self._text_batch.set_batch_wait_timeout_s(scfg.batch_wait_timeout_s)

    def __del__(self) -> None:
        self.svc.close()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _policy_batch(self, items: list[svc.Prepared]) -> list[tuple[Any, int, float]]:
        try:
            rows, ms = await asyncio.to_thread(self.svc.select_batch, items)
        except Exception as e:  # logged; every request of the batch hears why
            log.exception("policy batch of %d failed", len(items))
            return [(e, len(items), 0.0)] * len(items)
        return [(row, len(items), ms) for row in rows]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _text_batch(self, queries: list[tuple[str, list[str] | None]]) -> list[Any]:
        """Question/option embeddings of concurrent requests in one encoder call; so they also
        reach the policy batch together instead of one encoder call apart."""
        try:
            return await asyncio.to_thread(self.svc.embed_many, queries)
        except Exception as e:  # logged; every request of the batch hears why
            log.exception("text batch of %d failed", len(queries))
            return [e] * len(queries)

    async def _embed(self, query: tuple[str, list[str] | None]) -> Any:
        out = self.svc.cached_embedding(*query) or await self._text_batch(query)
        if isinstance(out, Exception):
            raise out
        return out

    async def _select(self, request: Request, model: type[SelectRequest]
                      ) -> tuple[svc.SelectResponse, SelectRequest, Any, str, Any]:
        t0 = time.perf_counter()
        req, upload = await self._parse(request, model)
        try:
            self.svc.check_one_source(req, upload)
            if req.url:
                upload = await self.svc.fetch(req)
                req = req.model_copy(update={"url": None})
            path, shown, sha = self.svc.source_path(req, upload)
            prep = await self.svc.prepare(req, path, shown, sha, embed=self._embed)
            row, batch_size, ms = None, 0, 0.0
            if prep.fallback is None:
                t = time.perf_counter()
                row, batch_size, ms = await self._policy_batch(prep)
                if isinstance(row, Exception):
                    raise row
                ms = (time.perf_counter() - t) * 1e3
            return self.svc.respond(prep, row, batch_size, ms, t0), req, path, shown, upload
        except BaseException:
            if upload is not None:
                upload.path.unlink(missing_ok=True)
            raise

    async def _parse(self, request: Request, model: type[SelectRequest]
                     ) -> tuple[SelectRequest, svc.Upload | None]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return svc.parse_json_body(await request.body(), model), None
        if ctype == "multipart/form-data":
            fields, upload = await svc.read_multipart(request, self.svc.scfg.max_upload_bytes,
                                                      self.svc.tmp_dir)
            try:
                return svc.request_from_form(fields, model), upload
            except BaseException:
                if upload is not None:
                    upload.path.unlink(missing_ok=True)
                raise
        raise ServiceError(415, "unsupported_media_type", f"content-type {ctype or 'none'!r}: "
                           "send application/json or multipart/form-data")

    @api.post("/v1/select", response_model=svc.SelectResponse, responses=_ERRORS,
              openapi_extra=_body_doc(SelectRequest))
    async def select(self, request: Request) -> svc.SelectResponse:
        """Select K frames of a video for a question (options optional: open-ended works)."""
        resp, _, _, _, upload = await self._select(request, SelectRequest)
        if upload is not None:
            upload.path.unlink(missing_ok=True)
        return resp

    @api.post("/v1/answer", response_model=svc.AnswerResponse, responses=_ERRORS,
              openapi_extra=_body_doc(AnswerRequest))
    async def answer(self, request: Request) -> svc.AnswerResponse:
        """Select K frames, then ask the answering VLM with them (options required)."""
        if self.answerer is None:
            raise ServiceError(404, "no_answer_model", "no answering model is deployed: set "
                               "serve.answer_model to a VLM checkpoint directory")
        t0 = time.perf_counter()
        sel, req, path, shown, upload = await self._select(request, AnswerRequest)
        try:
            frames = await self.svc.answer_frames(path, shown, sel.frame_indices)
        finally:
            if upload is not None:
                upload.path.unlink(missing_ok=True)
        t = time.perf_counter()
        out = await self.answerer.score.remote((frames, req.question, list(req.options or [])))
        if "error" in out:
            raise ServiceError(422, "answer_failed", f"the answering model refused the request: "
                               f"{out['error']}")
        info = await self.answerer.info.remote()
        timing = sel.timing_ms.model_copy(update={"answer": round((time.perf_counter() - t) * 1e3,
                                                                  3)})
        timing.total = round((time.perf_counter() - t0) * 1e3, 3)
        return svc.AnswerResponse(**svc.answer_payload(out["scores"], list(req.options or [])),
                                  frames_used=sel.frame_indices, timestamps_s=sel.timestamps_s,
                                  answer_model=info["id"], selection=sel, timing_ms=timing)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the replica's event loop answers."""
        return {"status": "ok", "pid": os.getpid(),
                "uptime_s": round(time.time() - self.svc.started, 1)}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: the selector is loaded and, if configured, the answering model answers."""
        body: dict[str, Any] = {"ready": True, "selector": True, "answer_model": None}
        if self.answerer is not None:
            try:
                await asyncio.wait_for(self.answerer.info.remote(), timeout=5)
                body["answer_model"] = True
            except Exception:  # noqa: BLE001 -- not ready yet (starting or restarting)
                body.update(ready=False, answer_model=False)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The selector (checkpoint id, encoders, pool, limits) and the answering model."""
        data = [self.svc.model_card()]
        if self.answerer is not None:
            data.append(await self.answerer.info.remote())
        return {"object": "list", "data": data}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder: args as in `refocus_ray.service.settings_from_args`."""
    settings = svc.settings_from_args(args)
    _, scfg = settings.load()
    answerer = None
    if scfg.answer_model:
        answerer = AnswerModel.options(
            ray_actor_options={"num_cpus": scfg.answer_num_cpus,
                               "runtime_env": {"env_vars": svc.answer_env()}},
        ).bind(scfg.answer_model, scfg.answer_mode, scfg.answer_max_frames, scfg.answer_dtype,
               scfg.answer_max_model_len, scfg.answer_max_batch_size)
    return Selector.options(**scfg.deployment_options()).bind(vars(settings), answerer)


def app(args: dict[str, Any]) -> serve.Application:
    """`serve run serve.app:app [checkpoint=DIR] [config=C] [media_roots=A:B] [key=value ...]`."""
    return build_app(args)
