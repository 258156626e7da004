from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReviewsRequest(_message.Message):
    __slots__ = ("product_id",)
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    def __init__(self, product_id: _Optional[str] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("author", "text", "stars")
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STARS_FIELD_NUMBER: _ClassVar[int]
    author: str
    text: str
    stars: int
    def __init__(self, author: _Optional[str] = ..., text: _Optional[str] = ..., stars: _Optional[int] = ...) -> None: ...

class ReviewsReply(_message.Message):
    __slots__ = ("product_id", "reviews", "served_by")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    reviews: _containers.RepeatedCompositeFieldContainer[Review]
    served_by: str
    def __init__(self, product_id: _Optional[str] = ..., reviews: _Optional[_Iterable[_Union[Review, _Mapping]]] = ..., served_by: _Optional[str] = ...) -> None: ...

class RatingRequest(_message.Message):
    __slots__ = ("product_id",)
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    def __init__(self, product_id: _Optional[str] = ...) -> None: ...

class RatingReply(_message.Message):
    __slots__ = ("product_id", "average", "count", "served_by")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    average: float
    count: int
    served_by: str
    def __init__(self, product_id: _Optional[str] = ..., average: _Optional[float] = ..., count: _Optional[int] = ..., served_by: _Optional[str] = ...) -> None: ...
