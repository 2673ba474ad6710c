"""The FLoRA engine: torch only; no Ray, gRPC, Redis or S3 imports.

Kept import-light on purpose: `adapter_format` is pure Python and is shared with
`adapters_store`, which must not pull torch in just to read a header.
"""
