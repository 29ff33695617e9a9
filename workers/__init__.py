"""Request handlers: the main worker (in the supervisor) and the per-VCPU workers."""
