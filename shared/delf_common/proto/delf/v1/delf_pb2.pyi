from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_RECEIVING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_RECEIVING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_CANCELLED: JobState

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "image_id", "box", "top_k", "filter", "correspondences")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    image_id: str
    box: Box
    top_k: int
    filter: _containers.ScalarMap[str, str]
    correspondences: bool
    def __init__(self, image: _Optional[bytes] = ..., image_id: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., correspondences: _Optional[bool] = ...) -> None: ...

class Correspondence(_message.Message):
    __slots__ = ("query", "indexed", "inlier")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    INLIER_FIELD_NUMBER: _ClassVar[int]
    query: Point
    indexed: Point
    inlier: bool
    def __init__(self, query: _Optional[_Union[Point, _Mapping]] = ..., indexed: _Optional[_Union[Point, _Mapping]] = ..., inlier: _Optional[bool] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("image_id", "metadata", "inliers", "score", "verified", "votes", "transform", "corners", "correspondences")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    CORNERS_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    metadata: _containers.ScalarMap[str, str]
    inliers: int
    score: float
    verified: bool
    votes: int
    transform: _containers.RepeatedScalarFieldContainer[float]
    corners: _containers.RepeatedCompositeFieldContainer[Point]
    correspondences: _containers.RepeatedCompositeFieldContainer[Correspondence]
    def __init__(self, image_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., inliers: _Optional[int] = ..., score: _Optional[float] = ..., verified: _Optional[bool] = ..., votes: _Optional[int] = ..., transform: _Optional[_Iterable[float]] = ..., corners: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., correspondences: _Optional[_Iterable[_Union[Correspondence, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("matches", "query_features", "elapsed_s", "verified_score")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    QUERY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_SCORE_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    query_features: int
    elapsed_s: float
    verified_score: float
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., query_features: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., verified_score: _Optional[float] = ...) -> None: ...

class AddImageRequest(_message.Message):
    __slots__ = ("image_id", "image", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, image_id: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("image_id", "metadata", "width", "height", "num_features", "pca_id", "thumbnail", "sha256", "duplicate_of", "skipped")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    PCA_ID_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    metadata: _containers.ScalarMap[str, str]
    width: int
    height: int
    num_features: int
    pca_id: str
    thumbnail: bytes
    sha256: str
    duplicate_of: _containers.RepeatedScalarFieldContainer[str]
    skipped: bool
    def __init__(self, image_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_features: _Optional[int] = ..., pca_id: _Optional[str] = ..., thumbnail: _Optional[bytes] = ..., sha256: _Optional[str] = ..., duplicate_of: _Optional[_Iterable[str]] = ..., skipped: _Optional[bool] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ("image_id", "descriptors_removed")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    descriptors_removed: int
    def __init__(self, image_id: _Optional[str] = ..., descriptors_removed: _Optional[int] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("image_id", "thumbnail")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    thumbnail: bool
    def __init__(self, image_id: _Optional[str] = ..., thumbnail: _Optional[bool] = ...) -> None: ...

class IngestItem(_message.Message):
    __slots__ = ("image_id", "metadata", "image", "location")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    metadata: _containers.ScalarMap[str, str]
    image: bytes
    location: str
    def __init__(self, image_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., image: _Optional[bytes] = ..., location: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("image_id", "reason")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    reason: str
    def __init__(self, image_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "total", "done", "failed", "errors", "created_at", "updated_at", "rate", "eta_s", "resent", "awaiting_upload", "stalled", "hint", "idle_s", "unchanged", "duplicates", "duplicates_skipped", "duplicate_of")
    class DuplicateOfEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    RESENT_FIELD_NUMBER: _ClassVar[int]
    AWAITING_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    total: int
    done: int
    failed: int
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    created_at: float
    updated_at: float
    rate: float
    eta_s: float
    resent: int
    awaiting_upload: int
    stalled: bool
    hint: str
    idle_s: float
    unchanged: int
    duplicates: int
    duplicates_skipped: int
    duplicate_of: _containers.ScalarMap[str, str]
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., total: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., rate: _Optional[float] = ..., eta_s: _Optional[float] = ..., resent: _Optional[int] = ..., awaiting_upload: _Optional[int] = ..., stalled: _Optional[bool] = ..., hint: _Optional[str] = ..., idle_s: _Optional[float] = ..., unchanged: _Optional[int] = ..., duplicates: _Optional[int] = ..., duplicates_skipped: _Optional[int] = ..., duplicate_of: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("images", "descriptors", "queue_depths", "model", "pca_id")
    class QueueDepthsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PCA_ID_FIELD_NUMBER: _ClassVar[int]
    images: int
    descriptors: int
    queue_depths: _containers.ScalarMap[str, int]
    model: str
    pca_id: str
    def __init__(self, images: _Optional[int] = ..., descriptors: _Optional[int] = ..., queue_depths: _Optional[_Mapping[str, int]] = ..., model: _Optional[str] = ..., pca_id: _Optional[str] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: _containers.ScalarMap[str, str]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "next_page_token")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    next_page_token: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
