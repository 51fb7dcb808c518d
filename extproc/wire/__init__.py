"""The ext_proc wire: the stream state machine over Envoy's protobuf types, and the decisions it speaks."""
