"""gRPC front door: auth, tenant -> adapter, quotas, per-tenant metrics (coming)."""
