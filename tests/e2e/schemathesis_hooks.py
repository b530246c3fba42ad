"""schemathesis hooks for test_api.py: POST /plan takes a TOML file
(`application/toml`), which schemathesis has no serializer for; a generated
string is sent as its UTF-8 bytes."""

import schemathesis


@schemathesis.serializer("application/toml")
def toml_text(ctx, value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")
