"""Conversions between the image messages of the ring (``ImageRequest``, ``ImageEvent``) and
exo's types (``ImageJob``, ``ImageEvent`` of ``exo.inference.diffusion.params``). The text ring's messages are in ``codec``; these live
apart because image requests share nothing with them but the stream they ride."""

from __future__ import annotations

from exo.inference.diffusion.params import ERROR_CODES, EVENT_KINDS, ImageEvent, ImageJob, ImageParams
from exo.networking.grpc import node_service_pb2 as pb


def job_to_proto(job: ImageJob) -> pb.ImageRequest:
    p = job.params
    msg = pb.ImageRequest(request_id=job.request_id, origin_node_id=job.origin_node_id,
                          origin_address=job.origin_address, model_id=job.model_id, prompt=p.prompt,
                          negative_prompt=p.negative_prompt, n=p.n, width=p.width, height=p.height, steps=p.steps,
                          guidance_scale=p.guidance_scale, seed=p.seed, strength=p.strength)
    if p.init_image is not None:
        msg.init_image = p.init_image
    return msg


def job_from_proto(msg: pb.ImageRequest) -> ImageJob:
    """Raises ValueError: an empty request id, origin or model, or parameters out of range
    (``ImageParams.check``)."""
    for name in ("request_id", "origin_node_id", "origin_address", "model_id"):
        if not getattr(msg, name):
            raise ValueError(f"image request: {name} is empty")
    params = ImageParams(prompt=msg.prompt, n=int(msg.n), width=int(msg.width), height=int(msg.height),
                         steps=int(msg.steps), guidance_scale=float(msg.guidance_scale), seed=int(msg.seed),
                         negative_prompt=msg.negative_prompt,
                         init_image=bytes(msg.init_image) if msg.HasField("init_image") else None,
                         strength=float(msg.strength))
    params.check()
    return ImageJob(msg.request_id, msg.origin_node_id, msg.origin_address, msg.model_id, params)


def event_to_proto(event: ImageEvent) -> pb.ImageEvent:
    return pb.ImageEvent(request_id=event.request_id, kind=event.kind, index=event.index, step=event.step,
                         total_steps=event.total_steps, png=event.png, error=event.error, code=event.code,
                         seed=event.seed)


def event_from_proto(msg: pb.ImageEvent) -> ImageEvent:
    """Raises ValueError: an empty request id, an unknown kind or error code."""
    if not msg.request_id:
        raise ValueError("image event: request_id is empty")
    if msg.kind not in EVENT_KINDS:
        raise ValueError(f"image event: unknown kind {msg.kind!r}")
    if msg.kind == "error" and msg.code not in ERROR_CODES:
        raise ValueError(f"image event: unknown error code {msg.code!r}")
    return ImageEvent(msg.request_id, msg.kind, int(msg.index), int(msg.step), int(msg.total_steps), bytes(msg.png),
                      msg.error, msg.code, int(msg.seed))
