"""Load generation for the dgserve.v1 gRPC API (``dgserve loadtest``): closed-loop concurrency sweeps over a
mix of request kinds, CSV and PNG reports (``docs/reliability.md``)."""
