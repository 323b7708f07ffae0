"""What the service's requests and answers look like (pydantic models, published in its OpenAPI schema).
(No `from __future__ import annotations` here: FastAPI and pydantic read these annotations at run time.)"""
from typing import Annotated, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from engine.batch import SearchOptions
from engine.duplicates import DEFAULT_DISTANCE_FRACTION, DEFAULT_RADIUS
from shards.codes import MAX_BITS
from shards.filters import Filter
from training.images import CropBox

MAX_K, MAX_POOL = 1000, 100_000
MAX_BATCH_QUERIES = 256  # queries in one POST /search/batch
MAX_CLASSES_WITHIN = 100
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
    inference_path: str = Field(description="how queries' images are encoded (engine/inference.py: eager, "
                                "openvino-bf16, ...)")
    model_ready: bool = Field(description="whether the model is loaded for searches by photo (the service loads "
                              "and compiles it while it starts; false until then, and where the catalog names no "
                              "model)")


def errors(*codes: int) -> dict:
    """The documented error answers of an endpoint: one shape for all, plus the id of the item a 409 names."""
    return {code: {"model": ExistsModel if code == 409 else ErrorModel} for code in codes}


class FilterParameters(BaseModel):
    """Which items a request looks at: the label and metadata filters (`shards.filters.Filter`)."""
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


class SearchParameters(FilterParameters):
    """The query string of both searches, validated in one pydantic call (FastAPI's path per parameter
    costs ~0.3 ms a request)."""
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    pool: int | None = Field(None, ge=1, le=MAX_POOL, description="Hamming candidates (default 100*k)")
    radius: int | None = Field(None, ge=0, le=MAX_BITS, description="pool = every code within this radius")
    nprobe: int | None = Field(None, ge=1, le=1 << 20, description="ivf catalogs: inverted lists each shard "
                               "visits (default: 1/64 of them, at least 16, more for a pool that spans many lists)")
    rerank: bool = Field(True, description="re-rank the pool by Euclidean distance")
    within: Literal["predicted"] | None = Field(None, description="predicted: only items of the classes the "
                                                "model predicts for the query (with the label and where filters)")
    within_top: int = Field(1, ge=1, le=MAX_CLASSES_WITHIN, description="with within=predicted: how many of the "
                            "most likely classes (2: the top two)")

    @property
    def within_predicted(self) -> int:
        """Classes to search within (0: all items)."""
        return self.within_top if self.within == "predicted" else 0

    def options(self) -> SearchOptions:
        return SearchOptions(self.k, self.pool, self.radius, self.rerank, self.filter, self.nprobe,
                             self.within_predicted)


class PhotoSearchParameters(SearchParameters):
    """A photo search's parameters: the search's, and the region of the photo to search with."""
    crop: str | None = Field(None, description="x,y,w,h: search with this region of the photo (pixels of the "
                             "upright image: as a browser shows it); default: the whole photo",
                             examples=["40,30,200,160"])

    @field_validator("crop")
    @classmethod
    def _box(cls, crop: str | None) -> str | None:
        if crop is not None:
            CropBox.parse(crop)  # a ValueError, worded: pydantic answers 422
        return crop

    @property
    def crop_box(self) -> CropBox | None:
        return None if self.crop is None else CropBox.parse(self.crop)


SEARCH_PARAMETERS = Annotated[SearchParameters, Query()]
PHOTO_SEARCH_PARAMETERS = Annotated[PhotoSearchParameters, Query()]


SERVICE_MAX_RADIUS = 2  # what one request may ask of a shared server (benchmarks/RESULTS.md, "Shop features")


class DuplicateParameters(FilterParameters):
    """GET /duplicates: which pairs count as near-identical, among which items."""
    radius: int = Field(DEFAULT_RADIUS, ge=0, le=SERVICE_MAX_RADIUS, description="pairs whose codes differ in at "
                        f"most this many bits (at most {SERVICE_MAX_RADIUS} here: each more costs ~6x the time and "
                        "more memory, 1M items at radius 2 ~40 s; `engine.duplicates` takes any)")
    max_distance: float | None = Field(None, ge=0, allow_inf_nan=False, description="... and whose features lie "
                                       "at most this far apart (Euclidean; default: "
                                       f"{DEFAULT_DISTANCE_FRACTION} of the median distance between random items)")


DUPLICATE_PARAMETERS = Annotated[DuplicateParameters, Query()]


class DuplicatesResponse(BaseModel):
    groups: list[list[ItemModel]] = Field(description="groups of near-identical items, largest first, each "
                                          "sorted by id")
    items: int = Field(description="items searched (those that pass label and where)")
    radius: int = Field(description="the Hamming radius searched")
    max_distance: float = Field(description="the feature distance that confirmed the pairs")
    hamming_pairs: int = Field(description="pairs within the radius")
    confirmed_pairs: int = Field(description="... of which within max_distance: the groups' links")


class BatchQueryModel(PhotoSearchParameters):
    """One query of a batch: `image` (an uploaded file, by its position among the `images` parts or its file
    name) or `id` (a catalog item), with its own parameters. `crop` applies to an image."""
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not a silent default
    image: int | str | None = Field(None, description="position (0-based) or file name of one of the uploaded "
                                    "images")
    id: int | None = Field(None, ge=0, le=MAX_ID, description="a catalog item id")

    @model_validator(mode="after")
    def _one_subject(self) -> "BatchQueryModel":
        if (self.image is None) == (self.id is None):
            raise ValueError("give exactly one of image and id")
        if self.crop is not None and self.id is not None:
            raise ValueError("crop applies to an image, not to an id")
        return self


BATCH_QUERIES = TypeAdapter(Annotated[list[BatchQueryModel], Field(min_length=1, max_length=MAX_BATCH_QUERIES)])
# The same, written out for the OpenAPI schema (a part's contentSchema: no references into a $defs of its own)
BATCH_QUERIES_SCHEMA = {"type": "array", "minItems": 1, "maxItems": MAX_BATCH_QUERIES,
                        "items": BatchQueryModel.model_json_schema()}


class BatchAnswer(BaseModel):
    query: str = Field(description="the image's file name, or id:ID")
    results: list[ResultModel] | None = Field(description="the results (null when `error` says why not)")
    error: str | None = Field(description="why this query has no results (an unusable image, a crop outside it, "
                              "an id not in the catalog), in one line; null if it has")


class BatchResponse(BaseModel):
    answers: list[BatchAnswer] = Field(description="one per query, in the order of `queries`")
