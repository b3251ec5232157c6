from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "device", "running", "finished", "loaded_models", "device_memory_allocated_bytes", "device_memory_total_bytes", "cache_bytes", "cache_budget_bytes", "images_held", "image_bytes", "queued", "queue_length", "workers", "cancelled", "refused", "threads_per_worker", "clients", "upload_bytes", "model_bytes", "limits_json", "devices")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_HELD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    THREADS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_JSON_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    version: str
    device: str
    running: int
    finished: int
    loaded_models: _containers.RepeatedScalarFieldContainer[str]
    device_memory_allocated_bytes: int
    device_memory_total_bytes: int
    cache_bytes: int
    cache_budget_bytes: int
    images_held: int
    image_bytes: int
    queued: int
    queue_length: int
    workers: int
    cancelled: int
    refused: int
    threads_per_worker: int
    clients: _containers.RepeatedCompositeFieldContainer[ClientUse]
    upload_bytes: int
    model_bytes: int
    limits_json: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceUse]
    def __init__(self, version: _Optional[str] = ..., device: _Optional[str] = ..., running: _Optional[int] = ..., finished: _Optional[int] = ..., loaded_models: _Optional[_Iterable[str]] = ..., device_memory_allocated_bytes: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_budget_bytes: _Optional[int] = ..., images_held: _Optional[int] = ..., image_bytes: _Optional[int] = ..., queued: _Optional[int] = ..., queue_length: _Optional[int] = ..., workers: _Optional[int] = ..., cancelled: _Optional[int] = ..., refused: _Optional[int] = ..., threads_per_worker: _Optional[int] = ..., clients: _Optional[_Iterable[_Union[ClientUse, _Mapping]]] = ..., upload_bytes: _Optional[int] = ..., model_bytes: _Optional[int] = ..., limits_json: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceUse, _Mapping]]] = ...) -> None: ...

class DeviceUse(_message.Message):
    __slots__ = ("device", "workers", "busy", "tiles", "lent_tiles", "busy_seconds", "loaded_models", "memory_allocated_bytes", "memory_total_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    LENT_TILES_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    workers: int
    busy: int
    tiles: int
    lent_tiles: int
    busy_seconds: float
    loaded_models: _containers.RepeatedScalarFieldContainer[str]
    memory_allocated_bytes: int
    memory_total_bytes: int
    def __init__(self, device: _Optional[str] = ..., workers: _Optional[int] = ..., busy: _Optional[int] = ..., tiles: _Optional[int] = ..., lent_tiles: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., loaded_models: _Optional[_Iterable[str]] = ..., memory_allocated_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...

class ClientUse(_message.Message):
    __slots__ = ("client", "open_calls", "running", "queued", "upload_bytes", "finished", "cancelled", "refused", "stalled", "bytes_sent")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    OPEN_CALLS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    client: str
    open_calls: int
    running: int
    queued: int
    upload_bytes: int
    finished: int
    cancelled: int
    refused: int
    stalled: int
    bytes_sent: int
    def __init__(self, client: _Optional[str] = ..., open_calls: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., upload_bytes: _Optional[int] = ..., finished: _Optional[int] = ..., cancelled: _Optional[int] = ..., refused: _Optional[int] = ..., stalled: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("version", "device", "feature_sets")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SETS_FIELD_NUMBER: _ClassVar[int]
    version: str
    device: str
    feature_sets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., device: _Optional[str] = ..., feature_sets: _Optional[_Iterable[str]] = ...) -> None: ...

class ListFeatureSetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeatureSetInfo(_message.Message):
    __slots__ = ("name", "description", "channels_per_image_channel")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_PER_IMAGE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    channels_per_image_channel: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., channels_per_image_channel: _Optional[int] = ...) -> None: ...

class ListFeatureSetsReply(_message.Message):
    __slots__ = ("feature_sets",)
    FEATURE_SETS_FIELD_NUMBER: _ClassVar[int]
    feature_sets: _containers.RepeatedCompositeFieldContainer[FeatureSetInfo]
    def __init__(self, feature_sets: _Optional[_Iterable[_Union[FeatureSetInfo, _Mapping]]] = ...) -> None: ...

class ImageLayout(_message.Message):
    __slots__ = ("dtype", "shape", "axes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    AXES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    axes: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., axes: _Optional[str] = ...) -> None: ...

class HasImageRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class HasImageReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: bool
    def __init__(self, present: _Optional[bool] = ...) -> None: ...

class UploadImageChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("layout", "sha256")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    layout: ImageLayout
    sha256: str
    def __init__(self, layout: _Optional[_Union[ImageLayout, _Mapping]] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadImageReply(_message.Message):
    __slots__ = ("sha256", "bytes_received")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    bytes_received: int
    def __init__(self, sha256: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class Encoding(_message.Message):
    __slots__ = ("compression", "level")
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    compression: str
    level: int
    def __init__(self, compression: _Optional[str] = ..., level: _Optional[int] = ...) -> None: ...

class FeatureOptions(_message.Message):
    __slots__ = ("backbone", "preset", "pca", "normalise", "input_range", "weights_sha256", "upsampler")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    PCA_FIELD_NUMBER: _ClassVar[int]
    NORMALISE_FIELD_NUMBER: _ClassVar[int]
    INPUT_RANGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLER_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    preset: str
    pca: int
    normalise: str
    input_range: str
    weights_sha256: str
    upsampler: str
    def __init__(self, backbone: _Optional[str] = ..., preset: _Optional[str] = ..., pca: _Optional[int] = ..., normalise: _Optional[str] = ..., input_range: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., upsampler: _Optional[str] = ...) -> None: ...

class ComputeFeaturesRequest(_message.Message):
    __slots__ = ("image_sha256", "feature_set", "encoding", "options", "resume", "chunk_indices", "feature_space_json", "fit_image_sha256")
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDICES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SPACE_JSON_FIELD_NUMBER: _ClassVar[int]
    FIT_IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    image_sha256: str
    feature_set: str
    encoding: Encoding
    options: FeatureOptions
    resume: bool
    chunk_indices: _containers.RepeatedScalarFieldContainer[int]
    feature_space_json: str
    fit_image_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_sha256: _Optional[str] = ..., feature_set: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, _Mapping]] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ..., resume: _Optional[bool] = ..., chunk_indices: _Optional[_Iterable[int]] = ..., feature_space_json: _Optional[str] = ..., fit_image_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image_sha256", "labels_sha256", "feature_set", "classifier", "trees", "encoding", "seed", "options")
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    LABELS_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    TREES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image_sha256: str
    labels_sha256: str
    feature_set: str
    classifier: str
    trees: int
    encoding: Encoding
    seed: int
    options: FeatureOptions
    def __init__(self, image_sha256: _Optional[str] = ..., labels_sha256: _Optional[str] = ..., feature_set: _Optional[str] = ..., classifier: _Optional[str] = ..., trees: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, _Mapping]] = ..., seed: _Optional[int] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("image_sha256", "labels_sha256", "feature_set", "options", "classifier", "trees", "seed")
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    LABELS_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    TREES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    image_sha256: _containers.RepeatedScalarFieldContainer[str]
    labels_sha256: _containers.RepeatedScalarFieldContainer[str]
    feature_set: str
    options: FeatureOptions
    classifier: str
    trees: int
    seed: int
    def __init__(self, image_sha256: _Optional[_Iterable[str]] = ..., labels_sha256: _Optional[_Iterable[str]] = ..., feature_set: _Optional[str] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ..., classifier: _Optional[str] = ..., trees: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("progress", "model_piece", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PIECE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    model_piece: bytes
    summary: ModelSummary
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., model_piece: _Optional[bytes] = ..., summary: _Optional[_Union[ModelSummary, _Mapping]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("sha256", "bytes", "class_values", "labelled_pixels", "classifier")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CLASS_VALUES_FIELD_NUMBER: _ClassVar[int]
    LABELLED_PIXELS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    bytes: int
    class_values: _containers.RepeatedScalarFieldContainer[int]
    labelled_pixels: int
    classifier: str
    def __init__(self, sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., class_values: _Optional[_Iterable[int]] = ..., labelled_pixels: _Optional[int] = ..., classifier: _Optional[str] = ...) -> None: ...

class ModelPiece(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class UploadModelReply(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("model_sha256", "image_sha256", "feature_set", "encoding")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    image_sha256: str
    feature_set: str
    encoding: Encoding
    def __init__(self, model_sha256: _Optional[str] = ..., image_sha256: _Optional[str] = ..., feature_set: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, _Mapping]] = ...) -> None: ...

class AnalyseRequest(_message.Message):
    __slots__ = ("image_sha256", "feature_set", "options", "analysis", "clusters", "seed")
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    image_sha256: str
    feature_set: str
    options: FeatureOptions
    analysis: str
    clusters: int
    seed: int
    def __init__(self, image_sha256: _Optional[str] = ..., feature_set: _Optional[str] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ..., analysis: _Optional[str] = ..., clusters: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class FewShotRequest(_message.Message):
    __slots__ = ("support_sha256", "support_mask_sha256", "query_sha256", "feature_set", "options", "window", "grid", "components")
    SUPPORT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_MASK_SHA256_FIELD_NUMBER: _ClassVar[int]
    QUERY_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    support_sha256: _containers.RepeatedScalarFieldContainer[str]
    support_mask_sha256: _containers.RepeatedScalarFieldContainer[str]
    query_sha256: str
    feature_set: str
    options: FeatureOptions
    window: int
    grid: int
    components: str
    def __init__(self, support_sha256: _Optional[_Iterable[str]] = ..., support_mask_sha256: _Optional[_Iterable[str]] = ..., query_sha256: _Optional[str] = ..., feature_set: _Optional[str] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ..., window: _Optional[int] = ..., grid: _Optional[int] = ..., components: _Optional[str] = ...) -> None: ...

class DatasetStream(_message.Message):
    __slots__ = ("progress", "header", "chunk", "trailer", "chunks")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    header: DatasetHeader
    chunk: DatasetChunk
    trailer: DatasetTrailer
    chunks: DatasetChunks
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., header: _Optional[_Union[DatasetHeader, _Mapping]] = ..., chunk: _Optional[_Union[DatasetChunk, _Mapping]] = ..., trailer: _Optional[_Union[DatasetTrailer, _Mapping]] = ..., chunks: _Optional[_Union[DatasetChunks, _Mapping]] = ...) -> None: ...

class DatasetChunks(_message.Message):
    __slots__ = ("chunks", "data_bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[DatasetChunk]
    data_bytes: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[DatasetChunk, _Mapping]]] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "notice")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    notice: str
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., notice: _Optional[str] = ...) -> None: ...

class DatasetHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "chunk_shape", "encoding", "attributes_json", "chunk_count", "result_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_JSON_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    RESULT_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    chunk_shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    attributes_json: str
    chunk_count: int
    result_key: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., chunk_shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, _Mapping]] = ..., attributes_json: _Optional[str] = ..., chunk_count: _Optional[int] = ..., result_key: _Optional[str] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("index", "offset", "data", "filter_mask", "sha256", "crc32")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILTER_MASK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    filter_mask: int
    sha256: bytes
    crc32: int
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., filter_mask: _Optional[int] = ..., sha256: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class DatasetTrailer(_message.Message):
    __slots__ = ("chunk_count", "sha256")
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    chunk_count: int
    sha256: str
    def __init__(self, chunk_count: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
