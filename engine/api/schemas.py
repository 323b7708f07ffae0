"""What the service's requests and answers look like (pydantic models, published in its OpenAPI schema).
(No `from __future__ import annotations` here: FastAPI and pydantic read these annotations at run time.)"""
from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, Field, field_validator

from shards.codes import MAX_BITS
from shards.filters import Filter

MAX_K, MAX_POOL = 1000, 100_000
MAX_ID = 2**63 - 1  # ids are 63-bit (engine.record.item_id)


class ResultModel(BaseModel):
    rank: int = Field(description="1 for the best match")
    id: int = Field(description="the item's catalog id")
    path: str | None = Field(description="the image file the item was indexed from")
    label: str | None = Field(description="the item's label (its class folder), if any")
    hamming: int = Field(description="Hamming distance between the codes (coarse stage)")
    distance: float | None = Field(description="Euclidean distance between the features (re-ranking stage)")
    metadata: dict | None = Field(description="the item's product metadata (SKU, title, price, ...)")


class SearchResponse(BaseModel):
    query: str = Field(description="the uploaded file's name, or id:ID")
    results: list[ResultModel]


class ItemModel(BaseModel):
    id: int
    path: str | None
    label: str | None
    metadata: dict | None


class Added(BaseModel):
    id: int


class Deleted(BaseModel):
    deleted: int


class ErrorModel(BaseModel):
    error: str = Field(description="what was wrong, in one line")


class ExistsModel(ErrorModel):
    id: int = Field(description="the item that holds this photo")


class Health(BaseModel):
    status: str
    items: int
    bits: int
    model: str | None = Field(description="fingerprint of the model that made the catalog's codes")


def errors(*codes: int) -> dict:
    """The documented error answers of an endpoint: one shape for all, plus the id of the item a 409 names."""
    return {code: {"model": ExistsModel if code == 409 else ErrorModel} for code in codes}


class SearchParameters(BaseModel):
    """The query string of both searches, validated in one pydantic call (FastAPI's path per parameter
    costs ~0.3 ms a request)."""
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    pool: int | None = Field(None, ge=1, le=MAX_POOL, description="Hamming candidates (default 100*k)")
    radius: int | None = Field(None, ge=0, le=MAX_BITS, description="pool = every code within this radius")
    nprobe: int | None = Field(None, ge=1, le=1 << 20, description="ivf catalogs: inverted lists each shard "
                               "visits (default: 1/64 of them, at least 16, more for a pool that spans many lists)")
    rerank: bool = Field(True, description="re-rank the pool by Euclidean distance")
    label: list[str] = Field([], description="only items with any of these labels")
    where: list[str] = Field([], description="only items whose metadata has field:value (repeatable)")

    @field_validator("where")
    @classmethod
    def _conditions(cls, where: list[str]) -> list[str]:
        Filter.parse((), where)  # its InvalidArgumentError is a ValueError: pydantic words it as a 422
        return where

    @property
    def filter(self) -> Filter:
        return Filter.parse(self.label, self.where)


SEARCH_PARAMETERS = Annotated[SearchParameters, Query()]
