"""Protocol buffers of the tandem API; generated modules are committed (see tests/proto)."""
