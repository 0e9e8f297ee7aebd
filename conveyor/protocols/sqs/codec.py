"""SQS wire codec, sans-IO: an HTTP request -> ``SqsRequest``; a result or error -> bytes.

Owns: telling the two SQS protocols apart and turning both into one shape, and
writing each protocol's answers and errors the way AWS does.
- AWS JSON 1.0: ``POST /`` with ``X-Amz-Target: AmazonSQS.<Action>`` and
  ``Content-Type: application/x-amz-json-1.0``; the body is the action's input as a
  JSON object. Errors: ``{"__type": "com.amazonaws.sqs#<Code>", "message": ...}``
  with the ``x-amzn-query-error: <legacy code>;Sender`` header.
- Query: ``Action=<Action>`` and parameters form-encoded in the body (or the query
  string); flattened lists and maps (``Attribute.1.Name``, ``AttributeName.1``,
  ``SendMessageBatchRequestEntry.1.Id``) are rebuilt into the JSON protocol's
  names (``Attributes``, ``AttributeNames``, ``Entries``) and integers parsed, so the
  handlers see one shape. Answers: ``<ActionResponse><ActionResult>...`` XML;
  errors: ``<ErrorResponse><Error><Type/><Code/><Message/>``.
Must not know: the broker, queues, sockets.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

from conveyor.protocols.sqs.errors import (
    InvalidAction,
    InvalidParameterValue,
    MissingParameter,
    SqsError,
)
from conveyor.protocols.sqs.framing import HttpRequest

Protocol = Literal["json", "query"]

JSON_CONTENT_TYPE: Final = "application/x-amz-json-1.0"
XML_NAMESPACE: Final = "http://queue.amazonaws.com/doc/2012-11-05/"
TARGET_PREFIX: Final = "AmazonSQS."

# Query names of flattened maps -> (JSON name, key field, value field).
_QUERY_MAPS: Final = {
    "Attribute": ("Attributes", "Name", "Value"),
    "Tag": ("Tags", "Key", "Value"),
    "MessageAttribute": ("MessageAttributes", "Name", "Value"),
    "MessageSystemAttribute": ("MessageSystemAttributes", "Name", "Value"),
}
# Query names of flattened lists -> JSON name.
_QUERY_LISTS: Final = {
    "AttributeName": "AttributeNames",
    "MessageAttributeName": "MessageAttributeNames",
    "MessageSystemAttributeName": "MessageSystemAttributeNames",
    "TagKey": "TagKeys",
    "AWSAccountId": "AWSAccountIds",
    "ActionName": "Actions",
    "SendMessageBatchRequestEntry": "Entries",
    "DeleteMessageBatchRequestEntry": "Entries",
    "ChangeMessageVisibilityBatchRequestEntry": "Entries",
    "StringListValue": "StringListValues",
    "BinaryListValue": "BinaryListValues",
}
_QUERY_INTEGERS: Final = frozenset({
    "MaxNumberOfMessages", "WaitTimeSeconds", "VisibilityTimeout", "DelaySeconds",
    "MaxResults", "MaxNumberOfMessagesPerSecond",
})
_INTEGER: Final = re.compile(r"-?[0-9]{1,18}")
# JSON result names written as repeated XML elements (AWS's flattened lists).
_XML_LISTS: Final = {
    "QueueUrls": "QueueUrl", "queueUrls": "QueueUrl", "Messages": "Message",
    "Failed": "BatchResultErrorEntry", "Results": "ListMessageMoveTasksResultEntry",
}
_XML_MAPS: Final = {
    "Attributes": ("Attribute", "Name", "Value"),
    "Tags": ("Tag", "Key", "Value"),
    "MessageAttributes": ("MessageAttribute", "Name", "Value"),
}


@dataclass(frozen=True, slots=True)
class SqsRequest:
    protocol: Protocol
    action: str
    params: dict[str, Any]
    path: str = "/"  # the query protocol may name the queue by its URL's path
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class SqsResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def decode_request(request: HttpRequest) -> SqsRequest:
    """Raises SqsError (answered in the protocol the request spoke)."""
    try:
        split = urlsplit(request.target)
    except ValueError:  # e.g. an unbalanced "[" (urllib reads it as an IPv6 host)
        raise InvalidParameterValue("The request target is not a valid URL.") from None
    target = request.headers.get("x-amz-target")
    if target is not None:
        return _decode_json(target, request.body, split.path)
    pairs = parse_qsl(split.query, keep_blank_values=True)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and request.body:
        if "x-www-form-urlencoded" not in content_type and "json" in content_type:
            raise MissingParameter("The request must contain the header X-Amz-Target.")
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameterValue("The request body is not valid UTF-8.") from None
        pairs += parse_qsl(text, keep_blank_values=True)
    flat = dict(pairs)
    action = flat.pop("Action", None)
    if not action:
        raise MissingParameter("The request must contain the parameter Action.")
    for name in ("Version", "AWSAccessKeyId", "Signature", "SignatureMethod",
                 "SignatureVersion", "Timestamp", "Expires", "SecurityToken"):
        flat.pop(name, None)
    for name in [name for name in flat if name.startswith("X-Amz-")]:
        flat.pop(name)  # a presigned URL's SigV4 parameters (sigv4.py)
    return SqsRequest("query", action, query_to_params(flat), split.path)


def _decode_json(target: str, body: bytes, path: str) -> SqsRequest:
    if not target.startswith(TARGET_PREFIX) or len(target) == len(TARGET_PREFIX):
        raise InvalidAction(f"The action {target} is not valid for this endpoint.")
    action = target[len(TARGET_PREFIX):]
    try:
        params = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameterValue("The request body is not valid JSON.") from None
    if not isinstance(params, dict):
        raise InvalidParameterValue("The request body must be a JSON object.")
    return SqsRequest("json", action, params, path)


def query_to_params(flat: dict[str, str]) -> dict[str, Any]:
    """Rebuild the JSON protocol's structure from flattened query parameters."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidParameterValue(f"Parameter {key} conflicts with another one.")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise InvalidParameterValue(f"Parameter {key} conflicts with another one.")
        node[parts[-1]] = value
    return _normalise(tree)


def _indexed(node: Any, name: str) -> list[Any]:
    if not isinstance(node, dict) or not all(key.isdigit() for key in node):
        raise InvalidParameterValue(f"Parameter {name} must be numbered ({name}.1, ...).")
    return [node[key] for key in sorted(node, key=int)]


def _normalise(tree: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in tree.items():
        if key in _QUERY_MAPS:
            name, key_field, value_field = _QUERY_MAPS[key]
            mapping: dict[str, Any] = {}
            for item in _indexed(value, key):
                if not isinstance(item, dict) or key_field not in item:
                    raise MissingParameter(f"The request must contain {key}.N.{key_field}.")
                entry = item.get(value_field, "")
                mapping[str(item[key_field])] = (
                    _normalise(entry) if isinstance(entry, dict) else entry)
            result[name] = mapping
        elif key in _QUERY_LISTS:
            items = _indexed(value, key)
            result[_QUERY_LISTS[key]] = [
                _normalise(item) if isinstance(item, dict) else item for item in items]
        elif isinstance(value, dict):
            result[key] = _normalise(value)
        elif key in _QUERY_INTEGERS and _INTEGER.fullmatch(value):
            result[key] = int(value)
        else:
            result[key] = value
    return result


# --- responses ------------------------------------------------------------------------
def encode_result(request: SqsRequest, result: dict[str, Any]) -> SqsResponse:
    headers = (("x-amzn-RequestId", request.request_id),)
    if request.protocol == "json":
        body = json.dumps(result, separators=(",", ":")).encode()
        return SqsResponse(200, (("Content-Type", JSON_CONTENT_TYPE), *headers), body)
    action = request.action
    inner = "".join(_xml_member(key, value, action) for key, value in result.items())
    text = (
        f'<?xml version="1.0"?><{action}Response xmlns="{XML_NAMESPACE}">'
        f"<{action}Result>{inner}</{action}Result>"
        f"<ResponseMetadata><RequestId>{request.request_id}</RequestId></ResponseMetadata>"
        f"</{action}Response>"
    )
    return SqsResponse(200, (("Content-Type", "text/xml"), *headers), text.encode())


def _xml_member(key: str, value: Any, action: str) -> str:
    if key in _XML_MAPS and isinstance(value, dict):
        element, key_field, value_field = _XML_MAPS[key]
        return "".join(
            f"<{element}><{key_field}>{escape(name)}</{key_field}>"
            f"{_xml_member(value_field, item, action)}</{element}>"
            for name, item in value.items())
    if isinstance(value, list):
        element = _XML_LISTS.get(key, f"{action}ResultEntry" if key == "Successful" else key)
        return "".join(_xml_member(element, item, action) for item in value)
    if isinstance(value, dict):
        inner = "".join(_xml_member(name, item, action) for name, item in value.items())
        return f"<{key}>{inner}</{key}>"
    if isinstance(value, bool):
        return f"<{key}>{'true' if value else 'false'}</{key}>"
    return f"<{key}>{escape(str(value))}</{key}>"


def encode_error(protocol: Protocol, error: SqsError, request_id: str) -> SqsResponse:
    fault = "Sender" if error.sender else "Receiver"
    headers = (("x-amzn-RequestId", request_id),)
    if protocol == "json":
        body = json.dumps({"__type": f"com.amazonaws.sqs#{error.code}",
                           "message": error.aws_message}).encode()
        return SqsResponse(error.http_status, (
            ("Content-Type", JSON_CONTENT_TYPE),
            ("x-amzn-query-error", f"{error.query_code};{fault}"), *headers), body)
    text = (
        f'<?xml version="1.0"?><ErrorResponse xmlns="{XML_NAMESPACE}"><Error>'
        f"<Type>{fault}</Type><Code>{escape(error.query_code)}</Code>"
        f"<Message>{escape(error.aws_message)}</Message><Detail/></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return SqsResponse(error.http_status, (("Content-Type", "text/xml"), *headers),
                       text.encode())


def protocol_of(request: HttpRequest) -> Protocol:
    """Which protocol to answer a request in, even one that failed to decode."""
    return "json" if "x-amz-target" in request.headers else "query"
