"""The admin API (``proto/extproc_plugins/admin/v1/admin.proto``): service, server and client helpers.

It manages keys (tenancy) and budgets at run time, so it is the one family that uses two others.
The generated code in ``extproc_plugins/admin/v1/`` is committed and checked fresh by the tests; to
regenerate it after changing the proto, from the checkout::

    python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/extproc_plugins/admin/v1/admin.proto
"""
