"""The admin API (``proto/extproc/admin/v1/admin.proto``): service, server and client helpers.

The generated code in ``extproc/admin/v1/`` is committed and checked fresh by the tests; to
regenerate it after changing the proto, from the checkout::

    python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/extproc/admin/v1/admin.proto
"""
