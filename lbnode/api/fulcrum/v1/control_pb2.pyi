import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(_message.Message):
    __slots__ = ("address", "weight", "name", "admin", "max_inflight", "max_connections")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    address: str
    weight: int
    name: str
    admin: str
    max_inflight: int
    max_connections: int
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[int] = ..., name: _Optional[str] = ..., admin: _Optional[str] = ..., max_inflight: _Optional[int] = ..., max_connections: _Optional[int] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "algorithm", "backends", "spec_json", "revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    algorithm: str
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    spec_json: str
    revision: int
    def __init__(self, name: _Optional[str] = ..., algorithm: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., spec_json: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class CreatePoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools", "revision")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    revision: int
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class UpdatePoolRequest(_message.Message):
    __slots__ = ("pool", "expected_revision")
    POOL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    expected_revision: int
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DeletePoolRequest(_message.Message):
    __slots__ = ("name", "expected_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_revision: int
    def __init__(self, name: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DeletePoolResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AddBackendRequest(_message.Message):
    __slots__ = ("pool", "backend")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: Backend
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ...) -> None: ...

class BackendRequest(_message.Message):
    __slots__ = ("pool", "backend")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: str
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class SetWeightRequest(_message.Message):
    __slots__ = ("pool", "backend", "weight")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: str
    weight: int
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class Certificate(_message.Message):
    __slots__ = ("name", "names", "issuer", "subject", "not_before", "not_after", "key_type", "fingerprint", "expiry", "listeners", "revision", "source", "chain_length", "chain_pem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    names: _containers.RepeatedScalarFieldContainer[str]
    issuer: str
    subject: str
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    key_type: str
    fingerprint: str
    expiry: str
    listeners: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    source: str
    chain_length: int
    chain_pem: str
    def __init__(self, name: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., issuer: _Optional[str] = ..., subject: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_type: _Optional[str] = ..., fingerprint: _Optional[str] = ..., expiry: _Optional[str] = ..., listeners: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ..., source: _Optional[str] = ..., chain_length: _Optional[int] = ..., chain_pem: _Optional[str] = ...) -> None: ...

class PutCertificateRequest(_message.Message):
    __slots__ = ("name", "chain_pem", "key_pem", "expected_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    chain_pem: bytes
    key_pem: bytes
    expected_revision: int
    def __init__(self, name: _Optional[str] = ..., chain_pem: _Optional[bytes] = ..., key_pem: _Optional[bytes] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class GetCertificateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCertificatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCertificatesResponse(_message.Message):
    __slots__ = ("certificates", "revision")
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    certificates: _containers.RepeatedCompositeFieldContainer[Certificate]
    revision: int
    def __init__(self, certificates: _Optional[_Iterable[_Union[Certificate, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteCertificateRequest(_message.Message):
    __slots__ = ("name", "expected_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_revision: int
    def __init__(self, name: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DeleteCertificateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Route(_message.Message):
    __slots__ = ("listener", "name", "spec_json", "revision", "pools", "missing_pools")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    MISSING_POOLS_FIELD_NUMBER: _ClassVar[int]
    listener: str
    name: str
    spec_json: str
    revision: int
    pools: _containers.RepeatedScalarFieldContainer[str]
    missing_pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, listener: _Optional[str] = ..., name: _Optional[str] = ..., spec_json: _Optional[str] = ..., revision: _Optional[int] = ..., pools: _Optional[_Iterable[str]] = ..., missing_pools: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ("listener",)
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    listener: str
    def __init__(self, listener: _Optional[str] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes", "revision")
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    revision: int
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class GetRouteRequest(_message.Message):
    __slots__ = ("listener", "name")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    listener: str
    name: str
    def __init__(self, listener: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class PutRouteRequest(_message.Message):
    __slots__ = ("route", "expected_revision")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    route: Route
    expected_revision: int
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DeleteRouteRequest(_message.Message):
    __slots__ = ("listener", "name", "expected_revision")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    listener: str
    name: str
    expected_revision: int
    def __init__(self, listener: _Optional[str] = ..., name: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DeleteRouteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class Listener(_message.Message):
    __slots__ = ("name", "protocol", "address", "pool")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol: str
    address: str
    pool: str
    def __init__(self, name: _Optional[str] = ..., protocol: _Optional[str] = ..., address: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class HealthSummary(_message.Message):
    __slots__ = ("pools", "backends", "up", "down", "unknown")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    pools: int
    backends: int
    up: int
    down: int
    unknown: int
    def __init__(self, pools: _Optional[int] = ..., backends: _Optional[int] = ..., up: _Optional[int] = ..., down: _Optional[int] = ..., unknown: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("id", "control_address", "listeners", "health", "draining", "config_revision", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    control_address: str
    listeners: _containers.RepeatedCompositeFieldContainer[Listener]
    health: HealthSummary
    draining: bool
    config_revision: int
    version: str
    def __init__(self, id: _Optional[str] = ..., control_address: _Optional[str] = ..., listeners: _Optional[_Iterable[_Union[Listener, _Mapping]]] = ..., health: _Optional[_Union[HealthSummary, _Mapping]] = ..., draining: _Optional[bool] = ..., config_revision: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("id", "address", "weight", "admin", "health", "health_reason", "inflight", "connections", "requests", "failures", "ejected_for", "responses", "response_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FOR_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    weight: int
    admin: str
    health: str
    health_reason: str
    inflight: int
    connections: int
    requests: int
    failures: int
    ejected_for: float
    responses: _containers.RepeatedCompositeFieldContainer[ResponseCount]
    response_seconds: Histogram
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[int] = ..., admin: _Optional[str] = ..., health: _Optional[str] = ..., health_reason: _Optional[str] = ..., inflight: _Optional[int] = ..., connections: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., ejected_for: _Optional[float] = ..., responses: _Optional[_Iterable[_Union[ResponseCount, _Mapping]]] = ..., response_seconds: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class ResponseCount(_message.Message):
    __slots__ = ("code", "count")
    CODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    code: str
    count: int
    def __init__(self, code: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("name", "algorithm", "backends", "queue_length", "retries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    algorithm: str
    backends: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    queue_length: int
    retries: int
    def __init__(self, name: _Optional[str] = ..., algorithm: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ..., queue_length: _Optional[int] = ..., retries: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "config_revision", "snapshot_version", "pools_count", "pools", "draining")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POOLS_COUNT_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    config_revision: int
    snapshot_version: int
    pools_count: int
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    draining: bool
    def __init__(self, node_id: _Optional[str] = ..., config_revision: _Optional[int] = ..., snapshot_version: _Optional[int] = ..., pools_count: _Optional[int] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class ListVipsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Vip(_message.Message):
    __slots__ = ("address", "prefixlen", "interface", "holder", "since")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIXLEN_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    address: str
    prefixlen: int
    interface: str
    holder: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, address: _Optional[str] = ..., prefixlen: _Optional[int] = ..., interface: _Optional[str] = ..., holder: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListVipsResponse(_message.Message):
    __slots__ = ("vips", "node_id")
    VIPS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    vips: _containers.RepeatedCompositeFieldContainer[Vip]
    node_id: str
    def __init__(self, vips: _Optional[_Iterable[_Union[Vip, _Mapping]]] = ..., node_id: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node_id", "vips")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    vips: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., vips: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolChanged(_message.Message):
    __slots__ = ("name", "change", "pool", "revision")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[PoolChanged.Change]
        CREATED: _ClassVar[PoolChanged.Change]
        UPDATED: _ClassVar[PoolChanged.Change]
        DELETED: _ClassVar[PoolChanged.Change]
    CHANGE_UNSPECIFIED: PoolChanged.Change
    CREATED: PoolChanged.Change
    UPDATED: PoolChanged.Change
    DELETED: PoolChanged.Change
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    change: PoolChanged.Change
    pool: Pool
    revision: int
    def __init__(self, name: _Optional[str] = ..., change: _Optional[_Union[PoolChanged.Change, str]] = ..., pool: _Optional[_Union[Pool, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class BackendHealthChanged(_message.Message):
    __slots__ = ("pool", "backend", "old", "new", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: str
    old: str
    new: str
    reason: str
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[str] = ..., old: _Optional[str] = ..., new: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class NodeChanged(_message.Message):
    __slots__ = ("node_id", "change")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[NodeChanged.Change]
        JOINED: _ClassVar[NodeChanged.Change]
        LEFT: _ClassVar[NodeChanged.Change]
    CHANGE_UNSPECIFIED: NodeChanged.Change
    JOINED: NodeChanged.Change
    LEFT: NodeChanged.Change
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    change: NodeChanged.Change
    def __init__(self, node_id: _Optional[str] = ..., change: _Optional[_Union[NodeChanged.Change, str]] = ...) -> None: ...

class VipMoved(_message.Message):
    __slots__ = ("vip", "old_holder", "new_holder")
    VIP_FIELD_NUMBER: _ClassVar[int]
    OLD_HOLDER_FIELD_NUMBER: _ClassVar[int]
    NEW_HOLDER_FIELD_NUMBER: _ClassVar[int]
    vip: str
    old_holder: str
    new_holder: str
    def __init__(self, vip: _Optional[str] = ..., old_holder: _Optional[str] = ..., new_holder: _Optional[str] = ...) -> None: ...

class CertificateChanged(_message.Message):
    __slots__ = ("name", "change", "fingerprint", "not_after", "revision")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[CertificateChanged.Change]
        ADDED: _ClassVar[CertificateChanged.Change]
        ROTATED: _ClassVar[CertificateChanged.Change]
        DELETED: _ClassVar[CertificateChanged.Change]
    CHANGE_UNSPECIFIED: CertificateChanged.Change
    ADDED: CertificateChanged.Change
    ROTATED: CertificateChanged.Change
    DELETED: CertificateChanged.Change
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    change: CertificateChanged.Change
    fingerprint: str
    not_after: _timestamp_pb2.Timestamp
    revision: int
    def __init__(self, name: _Optional[str] = ..., change: _Optional[_Union[CertificateChanged.Change, str]] = ..., fingerprint: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class RouteChanged(_message.Message):
    __slots__ = ("listener", "name", "change", "revision")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[RouteChanged.Change]
        CREATED: _ClassVar[RouteChanged.Change]
        UPDATED: _ClassVar[RouteChanged.Change]
        DELETED: _ClassVar[RouteChanged.Change]
    CHANGE_UNSPECIFIED: RouteChanged.Change
    CREATED: RouteChanged.Change
    UPDATED: RouteChanged.Change
    DELETED: RouteChanged.Change
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    listener: str
    name: str
    change: RouteChanged.Change
    revision: int
    def __init__(self, listener: _Optional[str] = ..., name: _Optional[str] = ..., change: _Optional[_Union[RouteChanged.Change, str]] = ..., revision: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "node_id", "time", "pool", "backend_health", "node", "vip_moved", "certificate", "route")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_HEALTH_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VIP_MOVED_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    node_id: str
    time: _timestamp_pb2.Timestamp
    pool: PoolChanged
    backend_health: BackendHealthChanged
    node: NodeChanged
    vip_moved: VipMoved
    certificate: CertificateChanged
    route: RouteChanged
    def __init__(self, seq: _Optional[int] = ..., node_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pool: _Optional[_Union[PoolChanged, _Mapping]] = ..., backend_health: _Optional[_Union[BackendHealthChanged, _Mapping]] = ..., node: _Optional[_Union[NodeChanged, _Mapping]] = ..., vip_moved: _Optional[_Union[VipMoved, _Mapping]] = ..., certificate: _Optional[_Union[CertificateChanged, _Mapping]] = ..., route: _Optional[_Union[RouteChanged, _Mapping]] = ...) -> None: ...
