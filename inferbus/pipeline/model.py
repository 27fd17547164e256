"""``Model``: the application end's "inference model", called like a function."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sized
from typing import ClassVar, Generic, TypeVar

from inferbus.codecs.base import Choices
from inferbus.pipeline.client import DEFAULT_TIMEOUT, Client, InferResult, Inputs

In = TypeVar("In")
Out = TypeVar("Out")


class Model(Generic[In, Out]):
    """Client-side pre- and post-processing around a remote model.

    Subclasses set ``name`` (and ``version`` to pin one, ``codec`` to choose how inputs
    travel) and override ``preprocess`` (raw input to tensors) and ``postprocess`` (outputs to
    an answer); then ``await model(x)``, or ``async for answer in model.map(xs)`` for many.
    """

    name: ClassVar[str]
    version: ClassVar[int | None] = None
    #: how inputs travel: a codec name or object, or a dict of them by input name
    codec: ClassVar[Choices] = None
    #: the codec the outputs should come back in
    reply_codec: ClassVar[str | None] = None

    def __init__(self, client: Client, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.client = client
        self.timeout = timeout

    def preprocess(self, item: In) -> Inputs:
        """Raw input to the tensors the model takes. The default passes arrays through."""
        return item  # type: ignore[return-value]

    def postprocess(self, outputs: InferResult) -> Out:
        """The model's outputs to the answer the application wants. The default returns them."""
        return outputs  # type: ignore[return-value]

    async def __call__(self, item: In) -> Out:
        inputs = self.preprocess(item)
        outputs = await self.client.infer(
            self.name,
            inputs,
            version=self.version,
            timeout=self.timeout,
            codec=self.codec,
            reply_codec=self.reply_codec,
        )
        return self.postprocess(outputs)

    async def map(
        self,
        items: Iterable[In],
        *,
        concurrency: int = 16,
        pack: int = 1,
        progress: bool | None = None,
    ) -> AsyncIterator[Out]:
        """The answer for every item, in order, through ``Client.map``: items are preprocessed
        as they are sent, ``pack`` > 1 sends that many consecutive items as one request (up to
        the model's max batch size), ``concurrency`` requests are in flight at once."""
        inputs = (self.preprocess(item) for item in items)
        results = self.client.map(
            self.name,
            inputs,
            version=self.version,
            timeout=self.timeout,
            concurrency=concurrency,
            pack=pack,
            codec=self.codec,
            reply_codec=self.reply_codec,
            progress=progress,
            total=len(items) if isinstance(items, Sized) else None,
        )
        async for outputs in results:
            yield self.postprocess(outputs)
