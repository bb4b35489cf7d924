"""The ZeroMQ API: JSON-RPC control (ROUTER) and multipart publish (PUB). Normative spec: docs/protocol.md."""

PROTOCOL_VERSION = "1.1"
