"""Generated gRPC stubs (scripts/gen-protos); do not edit."""
